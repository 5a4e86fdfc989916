//! The control service end to end: real `weft-control`, `weftctl` and `weft-proxy`
//! processes on loopback. Modules and chains pushed go live on the selected proxies only;
//! chains swap under load without a failed request; bad modules are refused or NACKed while
//! the last good chain serves; the store survives a restart; a proxy restarted while the
//! control service is down serves its persisted snapshot; registry endpoints expire and the
//! balancers follow.

use std::sync::Arc;
use std::time::{Duration, Instant};

use weft_proto::v1;
use weft_tests::*;

use crate::reload::{Traffic, greeting};

/// A proxy bootstrap: listener `ingress` to cluster `svc` over `endpoints`, no filters.
pub(crate) fn bootstrap(endpoints: &[String]) -> String {
    crate::chain("svc", &[], &[crate::cluster("svc", endpoints, "")]).replace("    filters:\n", "")
}

/// A chain resource for listener `ingress` running `compat_basic` (pushed as `basic`) with
/// plugin configuration `config` (YAML), on proxies with label `app: <app>`.
fn basic_chain(app: &str, config: &str) -> String {
    format!(
        "kind: Chain
name: {app}-ingress
selector: {{ app: {app} }}
spec:
  listener: ingress
  filters:
    - name: basic
      module: basic
      config: {config}
"
    )
}

/// Starts a proxy with bootstrap `boot` following `control` as `id` with one label.
pub(crate) async fn follower(
    control: &ControlProcess,
    boot: &str,
    workers: usize,
    id: &str,
    label: &str,
    state_dir: &std::path::Path,
) -> ProxyProcess {
    let args = control.proxy_args(id, &[label], state_dir);
    ProxyProcess::start_args_any(boot, workers, &args).await
}

/// Polls `check` every 50 ms until it holds, for at most `timeout`.
pub(crate) async fn eventually<F, Fut>(what: &str, timeout: Duration, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + timeout;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// `weftctl status -o json`: one object per proxy.
pub(crate) fn status(control: &ControlProcess) -> Vec<serde_json::Value> {
    let (code, out, err) = control.weftctl(&["status", "-o", "json"]);
    assert_eq!(code, 0, "weftctl status: {err}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("status json");
    v.get("proxies")
        .and_then(|p| p.as_array())
        .cloned()
        .or_else(|| v.as_array().cloned())
        .unwrap_or_default()
}

pub(crate) fn proxy_status(control: &ControlProcess, id: &str) -> serde_json::Value {
    status(control)
        .into_iter()
        .find(|p| p["id"] == id)
        .unwrap_or_default()
}

/// The greeting a request through `proxy` went upstream with ("" without the filter).
async fn greeting_via(proxy: &ProxyProcess) -> String {
    let got = get(&h1_client(), &proxy.url("/x")).await.expect("request");
    assert_eq!(got.status, 200, "{got:?}");
    greeting(&got)
}

fn push_basic(control: &ControlProcess) {
    let module = guest_filter("compat_basic");
    let (code, out, err) = control.weftctl(&[
        "module",
        "push",
        module.to_str().expect("path"),
        "--name",
        "basic",
    ]);
    assert_eq!(code, 0, "push: {out}{err}");
}

pub(crate) fn apply(control: &ControlProcess, manifest: &str) -> String {
    let (code, out, err) = control.weftctl_stdin(&["apply", "-f", "-"], Some(manifest));
    assert_eq!(code, 0, "apply: {out}{err}");
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pushed_chain_goes_live_on_the_selected_proxies_only() {
    let dir = tempfile::tempdir().expect("tempdir");
    let control = ControlProcess::start(&dir.path().join("data")).await;
    let up = Upstream::start("svc").await;
    let boot = bootstrap(&[up.address()]);
    let s1 = follower(&control, &boot, 1, "s1-a", "app=s1", &dir.path().join("s1")).await;
    let s2 = follower(&control, &boot, 1, "s2-a", "app=s2", &dir.path().join("s2")).await;
    push_basic(&control);
    let (code, out, _) = control.weftctl(&["module", "ls", "-o", "json"]);
    assert_eq!(code, 0);
    assert!(
        out.contains("sha256:") && out.contains("\"basic\""),
        "{out}"
    );

    // A dry run changes nothing and shows the diff.
    let (code, out, err) = control.weftctl_stdin(
        &["apply", "-f", "-", "--dry-run"],
        Some(&basic_chain("s1", "{ greeting: hello }")),
    );
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("created") && out.contains("+ "), "{out}");
    assert_eq!(greeting_via(&s1).await, "");

    let out = apply(&control, &basic_chain("s1", "{ greeting: hello }"));
    assert!(out.contains("chain/s1-ingress created"), "{out}");
    let (code, out, err) = control.weftctl(&[
        "rollout",
        "status",
        "--selector",
        "app=s1",
        "--timeout",
        "30",
    ]);
    assert_eq!(code, 0, "rollout: {out}{err}\n{}", s1.log());

    assert_eq!(greeting_via(&s1).await, "hello", "s1 runs the chain");
    assert_eq!(greeting_via(&s2).await, "", "s2 is not selected");
    // The admin endpoint shows what runs and where it came from.
    let (code, dump) = s1.admin_get("/config_dump").await.expect("admin");
    assert_eq!(code, 200);
    let dump: serde_json::Value = serde_json::from_str(&dump).expect("json");
    assert_eq!(dump["control"]["connected"], true, "{dump}");
    assert_eq!(dump["control"]["id"], "s1-a");
    assert!(dump["control"]["version"].as_u64() >= Some(1), "{dump}");
    assert_eq!(
        dump["config"]["listeners"][0]["filters"][0]["name"],
        "basic"
    );
    let st = proxy_status(&control, "s1-a");
    assert_eq!(st["connected"], true, "{st}");

    // Applying the same manifest again is unchanged: no new version.
    let out = apply(&control, &basic_chain("s1", "{ greeting: hello }"));
    assert!(out.contains("unchanged"), "{out}");

    // The module is in use: it cannot be deleted.
    let (code, _, err) = control.weftctl(&["module", "rm", "basic"]);
    assert_eq!(code, 1);
    assert!(err.contains("used by chain `s1-ingress`"), "{err}");

    // Deleting the chain brings the bootstrap chain (none) back.
    let (code, _, err) = control.weftctl(&["delete", "chain", "s1-ingress"]);
    assert_eq!(code, 0, "{err}");
    let s1_ref = &s1;
    eventually(
        "s1 to drop the chain",
        Duration::from_secs(20),
        || async move { greeting_via(s1_ref).await.is_empty() },
    )
    .await;
    let (code, _, err) = control.weftctl(&["module", "rm", "basic"]);
    assert_eq!(code, 0, "{err}");
}

/// Applies a chain over gRPC and waits until proxy `id` runs it (or NACKs it).
async fn apply_and_wait(
    config: &mut v1::config_client::ConfigClient<tonic::transport::Channel>,
    discovery: &mut v1::discovery_client::DiscoveryClient<tonic::transport::Channel>,
    greeting: &str,
    id: &str,
) -> u64 {
    let resource = v1::Resource {
        kind: "Chain".into(),
        name: "s1-ingress".into(),
        selector: [("app".to_string(), "s1".to_string())].into(),
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
    };
    let version = config
        .apply(v1::ApplyRequest {
            resources: vec![resource],
            dry_run: false,
        })
        .await
        .expect("apply")
        .into_inner()
        .version;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let st = discovery
            .status(v1::StatusRequest {})
            .await
            .expect("status")
            .into_inner();
        let p = st.proxies.iter().find(|p| p.id == id);
        if p.is_some_and(|p| p.synced_version >= version) {
            return version;
        }
        if let Some(p) = p.filter(|p| !p.nack_error.is_empty() && p.nacked_version >= version) {
            panic!("NACK: {}", p.nack_error);
        }
        assert!(Instant::now() < deadline, "version {version} not live");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_chain_swaps_from_the_control_service_under_load_fail_no_request() {
    let dir = tempfile::tempdir().expect("tempdir");
    let control = ControlProcess::start(&dir.path().join("data")).await;
    let up = Upstream::start("svc").await;
    push_basic(&control);
    apply(&control, &basic_chain("s1", "{ greeting: v0 }"));
    let proxy = Arc::new(
        follower(
            &control,
            &bootstrap(&[up.address()]),
            2,
            "s1-a",
            "app=s1",
            &dir.path().join("s1"),
        )
        .await,
    );
    let p = proxy.clone();
    eventually("v0 live", Duration::from_secs(30), || {
        let p = p.clone();
        async move { greeting_via(&p).await == "v0" }
    })
    .await;

    // 2,000 requests a second in all: 16 clients, each paced at one request per 8 ms.
    let traffic = Traffic::start(proxy.clone(), 16, Some(Duration::from_millis(8)));
    // A slow request started on v0 finishes on v0 whatever is swapped meanwhile.
    let slow = {
        let proxy = proxy.clone();
        tokio::spawn(async move { get(&h1_client(), &proxy.url("/delay/1500/slow")).await })
    };
    tokio::time::sleep(Duration::from_millis(100)).await;
    let channel = tonic::transport::Endpoint::from_shared(control.url())
        .expect("url")
        .connect()
        .await
        .expect("connect");
    let mut config = v1::config_client::ConfigClient::new(channel.clone());
    let mut discovery = v1::discovery_client::DiscoveryClient::new(channel);
    let started = Instant::now();
    let mut versions = Vec::new();
    for v in 1..=100 {
        versions.push(apply_and_wait(&mut config, &mut discovery, &format!("v{v}"), "s1-a").await);
    }
    let swap_time = started.elapsed();
    let slow = slow.await.expect("join").expect("slow request");
    assert_eq!(
        greeting(&slow),
        "v0",
        "the in-flight request kept its chain"
    );
    assert_eq!(greeting_via(&proxy).await, "v100");
    let (sent, failed) = traffic.finish().await;
    eprintln!(
        "{sent} requests ({:.0}/s) across 100 swaps in {swap_time:?}",
        sent as f64 / (swap_time.as_secs_f64() + 0.1)
    );
    if failed > 0 {
        let log = proxy.log();
        let errors: Vec<&str> = log
            .lines()
            .filter(|l| l.contains("ERROR") || l.contains("WARN"))
            .take(20)
            .collect();
        panic!(
            "{failed} of {sent} requests failed; proxy log:\n{}",
            errors.join("\n")
        );
    }
    assert!(
        versions.windows(2).all(|w| w[0] < w[1]),
        "each apply made a new version"
    );
    let stats = proxy.stats().await;
    assert!(
        metric_value(&stats, "weft_filter_chain_swaps_total").unwrap_or(0.0) >= 101.0,
        "{stats}"
    );
}

/// A module whose `_initialize` traps (hand-assembled: it also exports the ABI version, so
/// the control service accepts it and only starting it fails).
fn trapping_module() -> Vec<u8> {
    let mut m = b"\0asm\x01\0\0\0".to_vec();
    m.extend([0x01, 0x04, 0x01, 0x60, 0x00, 0x00]); // type: () -> ()
    m.extend([0x03, 0x03, 0x02, 0x00, 0x00]); // two functions of that type
    let mut exports = vec![0x02];
    for (name, index) in [("_initialize", 0u8), ("proxy_abi_version_0_2_1", 1)] {
        exports.push(name.len() as u8);
        exports.extend(name.as_bytes());
        exports.extend([0x00, index]);
    }
    m.push(0x07);
    m.push(exports.len() as u8);
    m.extend(exports);
    // _initialize: unreachable; the version export: nothing.
    m.extend([0x0a, 0x08, 0x02, 0x03, 0x00, 0x00, 0x0b, 0x02, 0x00, 0x0b]);
    m
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_modules_are_refused_or_nacked_and_the_last_good_chain_keeps_serving() {
    let dir = tempfile::tempdir().expect("tempdir");
    let control = ControlProcess::start(&dir.path().join("data")).await;
    let up = Upstream::start("svc").await;
    push_basic(&control);
    apply(&control, &basic_chain("s1", "{ greeting: good }"));
    let proxy = follower(
        &control,
        &bootstrap(&[up.address()]),
        1,
        "s1-a",
        "app=s1",
        &dir.path().join("s1"),
    )
    .await;
    let p = &proxy;
    eventually("the good chain", Duration::from_secs(30), || async move {
        greeting_via(p).await == "good"
    })
    .await;

    // Garbage never gets in: refused at upload with the reason.
    let garbage = dir.path().join("garbage.wasm");
    std::fs::write(&garbage, b"this is not wasm").expect("write");
    let (code, _, err) = control.weftctl(&["module", "push", garbage.to_str().expect("path")]);
    assert_eq!(code, 1);
    assert!(err.contains("not a WebAssembly module"), "{err}");
    let (code, out, _) = control.weftctl(&["module", "ls"]);
    assert_eq!(code, 0);
    assert!(!out.contains("garbage"), "{out}");
    // A module that is wasm but does not compile.
    std::fs::write(&garbage, b"\0asm\x01\0\0\0\x01\xff").expect("write");
    let (code, _, err) = control.weftctl(&["module", "push", garbage.to_str().expect("path")]);
    assert_eq!(code, 1);
    assert!(err.contains("does not compile"), "{err}");

    // `on_configure` returns false: the proxy NACKs, the good chain stays.
    apply(&control, &basic_chain("s1", "refuse"));
    let (code, out, err) = control.weftctl(&["rollout", "status", "--timeout", "30"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(
        err.contains("rejected") || out.contains("rejected"),
        "{out}{err}"
    );
    let st = proxy_status(&control, "s1-a");
    let nack = st["nack_error"].as_str().unwrap_or_default().to_owned();
    assert!(nack.contains("on_configure"), "{st}");
    // The filter's own words reach the operator, not only the proxy's log.
    assert!(nack.contains("configured with refuse"), "{st}");
    let (_, table, _) = control.weftctl(&["status"]);
    assert!(table.contains("NACK"), "{table}");
    assert!(table.contains("configured with refuse"), "{table}");
    assert_eq!(greeting_via(&proxy).await, "good");

    // A module whose `_initialize` traps: accepted by the service (it compiles and has the
    // ABI), NACKed by the proxy's canary.
    let trap = dir.path().join("trap.wasm");
    std::fs::write(&trap, trapping_module()).expect("write");
    let (code, out, err) = control.weftctl(&[
        "module",
        "push",
        trap.to_str().expect("path"),
        "--name",
        "trap",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    apply(
        &control,
        &basic_chain("s1", "{ greeting: never }").replace("module: basic", "module: trap"),
    );
    let (code, out, err) = control.weftctl(&["rollout", "status", "--timeout", "30"]);
    assert_eq!(code, 1, "{out}{err}");
    let st = proxy_status(&control, "s1-a");
    let nack = st["nack_error"].as_str().unwrap_or_default().to_owned();
    assert!(
        nack.contains("trap") || nack.contains("unreachable"),
        "{st}"
    );
    assert_eq!(greeting_via(&proxy).await, "good");

    // A good chain afterwards goes live: the proxy was not left stuck.
    apply(&control, &basic_chain("s1", "{ greeting: better }"));
    let (code, out, err) = control.weftctl(&["rollout", "status", "--timeout", "30"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(greeting_via(&proxy).await, "better");
    let st = proxy_status(&control, "s1-a");
    assert_eq!(st["nack_error"].as_str().unwrap_or_default(), "", "{st}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_service_restart_loses_nothing_and_proxies_converge() {
    let dir = tempfile::tempdir().expect("tempdir");
    let data = dir.path().join("data");
    let port = free_port();
    let mut control = ControlProcess::start_at(&data, port, None).await;
    let up = Upstream::start("svc").await;
    push_basic(&control);
    apply(&control, &basic_chain("s1", "{ greeting: before }"));
    let (code, _, err) = control.weftctl(&["register", "svc", &up.address(), "--ttl", "60"]);
    assert_eq!(code, 0, "{err}");
    let proxy = follower(
        &control,
        &bootstrap(&[up.address()]),
        1,
        "s1-a",
        "app=s1",
        &dir.path().join("s1"),
    )
    .await;
    let (code, out, err) = control.weftctl(&["rollout", "status", "--timeout", "30"]);
    assert_eq!(code, 0, "{out}{err}");
    let (_, modules_before, _) = control.weftctl(&["module", "ls", "-o", "json"]);
    let (_, chains_before, _) = control.weftctl(&["get", "chains", "-o", "json"]);
    let (_, services_before, _) = control.weftctl(&["get", "services", "-o", "json"]);
    assert!(services_before.contains(&up.address()), "{services_before}");

    control.kill();
    // The proxy keeps serving its config while the control service is gone.
    for _ in 0..20 {
        assert_eq!(greeting_via(&proxy).await, "before");
    }
    let mut control = ControlProcess::start_at(&data, port, None).await;
    let (_, modules_after, _) = control.weftctl(&["module", "ls", "-o", "json"]);
    let (_, chains_after, _) = control.weftctl(&["get", "chains", "-o", "json"]);
    let (_, services_after, _) = control.weftctl(&["get", "services", "-o", "json"]);
    assert_eq!(modules_before, modules_after);
    assert_eq!(chains_before, chains_after);
    assert!(services_after.contains(&up.address()), "{services_after}");

    // The proxy reconnects (within its first backoff steps) and converges on a new apply.
    let c = &control;
    eventually(
        "the proxy to reconnect",
        Duration::from_secs(20),
        || async move { proxy_status(c, "s1-a")["connected"] == true },
    )
    .await;
    apply(&control, &basic_chain("s1", "{ greeting: after }"));
    let (code, out, err) = control.weftctl(&["rollout", "status", "--timeout", "30"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(greeting_via(&proxy).await, "after");
    control.kill();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_proxy_restarted_while_the_control_service_is_down_serves_its_persisted_config() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut control = ControlProcess::start(&dir.path().join("data")).await;
    let up = Upstream::start("svc").await;
    let other = Upstream::start("other").await;
    push_basic(&control);
    apply(&control, &basic_chain("s1", "{ greeting: persisted }"));
    // The control service moves the cluster to another endpoint.
    apply(
        &control,
        &format!(
            "kind: Cluster\nname: svc\nspec:\n  endpoints: [ {{ address: \"{}\" }} ]\n",
            other.address()
        ),
    );
    let boot = bootstrap(&[up.address()]);
    let args = control.proxy_args("s1-a", &["app=s1"], &dir.path().join("s1"));
    let (admin, listen) = (free_port(), free_port());
    let proxy = ProxyProcess::start_args(&boot, 1, &args, admin, listen).await;
    let (code, out, err) = control.weftctl(&["rollout", "status", "--timeout", "30"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(greeting_via(&proxy).await, "persisted");
    drop(proxy);
    control.kill();

    let before = other.hits();
    let proxy = ProxyProcess::start_args(&boot, 1, &args, admin, listen).await;
    assert_eq!(greeting_via(&proxy).await, "persisted", "{}", proxy.log());
    assert_eq!(other.hits(), before + 1, "the persisted endpoints are used");
    assert_eq!(up.hits(), 0, "not the bootstrap endpoint");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_endpoints_expire_after_missed_heartbeats_and_balancers_follow() {
    let dir = tempfile::tempdir().expect("tempdir");
    let control = ControlProcess::start(&dir.path().join("data")).await;
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    apply(
        &control,
        "kind: Cluster\nname: svc\nselector: { app: s1 }\nspec:\n  service: svc\n",
    );
    // Both register with a 2 s TTL and keep heartbeating, each from its own process.
    let keep_alive = |address: String| {
        std::process::Command::new(workspace_bin("weftctl"))
            .args(["--server", &control.url(), "register", "svc", &address])
            .args(["--ttl", "2", "--keep-alive"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("weftctl register --keep-alive")
    };
    let mut keeper = keep_alive(a.address());
    let mut b_keeper = keep_alive(b.address());
    // The bootstrap endpoint is a dead port: only the registry's endpoints can answer.
    let proxy = follower(
        &control,
        &bootstrap(&[format!("127.0.0.1:{}", free_port())]),
        1,
        "s1-a",
        "app=s1",
        &dir.path().join("s1"),
    )
    .await;
    let p = &proxy;
    eventually(
        "both instances in the cluster",
        Duration::from_secs(20),
        || async move {
            p.clusters().await["clusters"][0]["endpoints"]
                .as_array()
                .is_some_and(|e| e.len() == 2)
        },
    )
    .await;
    let before_b = b.hits();
    let client = h1_client();
    for _ in 0..20 {
        let got = get(&client, &proxy.url("/x")).await.expect("request");
        assert_eq!(got.status, 200);
    }
    assert!(b.hits() > before_b, "b served while registered");

    // b's heartbeats stop (killed: no goodbye); after its TTL it leaves the cluster, and
    // all traffic goes to a.
    let _ = b_keeper.kill();
    let _ = b_keeper.wait();
    eventually("b to expire", Duration::from_secs(20), || async move {
        p.clusters().await["clusters"][0]["endpoints"]
            .as_array()
            .is_some_and(|e| e.len() == 1)
    })
    .await;
    let (code, out, _) = control.weftctl(&["get", "services"]);
    assert_eq!(code, 0);
    assert!(
        out.contains(&a.address()) && !out.contains(&b.address()),
        "{out}"
    );
    let (a0, b0) = (a.hits(), b.hits());
    for _ in 0..20 {
        let got = get(&client, &proxy.url("/x")).await.expect("request");
        assert_eq!(got.status, 200);
    }
    assert_eq!(b.hits(), b0, "no request for the expired instance");
    assert_eq!(a.hits(), a0 + 20);
    let _ = keeper.kill();
    let _ = keeper.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_api_needs_the_token_when_it_has_one() {
    let dir = tempfile::tempdir().expect("tempdir");
    let control =
        ControlProcess::start_at(&dir.path().join("data"), free_port(), Some("s3cret")).await;
    let out = std::process::Command::new(workspace_bin("weftctl"))
        .args(["--server", &control.url(), "module", "ls"])
        .env_remove("WEFT_TOKEN")
        .output()
        .expect("weftctl");
    assert_eq!(out.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("Bearer"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = std::process::Command::new(workspace_bin("weftctl"))
        .args([
            "--server",
            &control.url(),
            "--token",
            "wrong",
            "module",
            "ls",
        ])
        .env_remove("WEFT_TOKEN")
        .output()
        .expect("weftctl");
    assert_eq!(out.status.code(), Some(1));
    // With the token (ControlProcess passes it), everything works, proxies included.
    push_basic(&control);
    apply(&control, &basic_chain("s1", "{ greeting: authed }"));
    let up = Upstream::start("svc").await;
    let token_file = dir.path().join("token");
    std::fs::write(&token_file, "s3cret\n").expect("write");
    let mut args = control.proxy_args("s1-a", &["app=s1"], &dir.path().join("s1"));
    args.extend([
        "--control-token-file".to_owned(),
        token_file.display().to_string(),
    ]);
    let proxy = ProxyProcess::start_args_any(&bootstrap(&[up.address()]), 1, &args).await;
    let p = &proxy;
    eventually(
        "the chain via an authenticated stream",
        Duration::from_secs(30),
        || async move { greeting_via(p).await == "authed" },
    )
    .await;
}

/// A control service that lies: its snapshot names one module digest, and fetching that
/// digest returns other bytes.
#[derive(Clone)]
struct Liar {
    snapshot: v1::Snapshot,
    bytes: Arc<std::sync::Mutex<Vec<u8>>>,
    answers: Arc<std::sync::Mutex<Vec<v1::DiscoveryRequest>>>,
}

type Stream<T> =
    std::pin::Pin<Box<dyn tokio_stream::Stream<Item = Result<T, tonic::Status>> + Send>>;

#[tonic::async_trait]
impl v1::discovery_server::Discovery for Liar {
    type SubscribeStream = Stream<v1::Snapshot>;

    async fn subscribe(
        &self,
        request: tonic::Request<tonic::Streaming<v1::DiscoveryRequest>>,
    ) -> Result<tonic::Response<Self::SubscribeStream>, tonic::Status> {
        use tokio_stream::StreamExt as _;
        let mut inbound = request.into_inner();
        let answers = self.answers.clone();
        tokio::spawn(async move {
            while let Ok(Some(m)) = inbound.message().await {
                answers.lock().expect("lock").push(m);
            }
        });
        let once = tokio_stream::iter([Ok(self.snapshot.clone())]);
        Ok(tonic::Response::new(Box::pin(
            once.chain(tokio_stream::pending()),
        )))
    }

    async fn status(
        &self,
        _: tonic::Request<v1::StatusRequest>,
    ) -> Result<tonic::Response<v1::StatusResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("liar"))
    }

    type TapsStream = Stream<v1::TapCommand>;

    async fn taps(
        &self,
        _: tonic::Request<tonic::Streaming<v1::TapEvent>>,
    ) -> Result<tonic::Response<Self::TapsStream>, tonic::Status> {
        Err(tonic::Status::unimplemented("liar"))
    }
}

#[tonic::async_trait]
impl v1::modules_server::Modules for Liar {
    async fn push(
        &self,
        _: tonic::Request<tonic::Streaming<v1::PushChunk>>,
    ) -> Result<tonic::Response<v1::Module>, tonic::Status> {
        Err(tonic::Status::unimplemented("liar"))
    }

    async fn list(
        &self,
        _: tonic::Request<v1::ListModulesRequest>,
    ) -> Result<tonic::Response<v1::ListModulesResponse>, tonic::Status> {
        Err(tonic::Status::unimplemented("liar"))
    }

    type FetchStream = Stream<v1::ModuleChunk>;

    async fn fetch(
        &self,
        _: tonic::Request<v1::FetchModuleRequest>,
    ) -> Result<tonic::Response<Self::FetchStream>, tonic::Status> {
        let chunk = v1::ModuleChunk {
            data: self.bytes.lock().expect("lock").clone(),
            signature: String::new(),
        };
        Ok(tonic::Response::new(Box::pin(tokio_stream::iter([Ok(
            chunk,
        )]))))
    }

    async fn delete(
        &self,
        _: tonic::Request<v1::DeleteModuleRequest>,
    ) -> Result<tonic::Response<v1::Module>, tonic::Status> {
        Err(tonic::Status::unimplemented("liar"))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn module_bytes_that_do_not_match_their_digest_are_nacked_never_run_and_retried() {
    use sha2::Digest as _;
    let basic = std::fs::read(guest_filter("compat_basic")).expect("compat_basic");
    let noop = std::fs::read(guest_filter("compat_noop")).expect("compat_noop");
    let digest = format!("sha256:{}", hex::encode(sha2::Sha256::digest(&basic)));
    let liar = Liar {
        snapshot: v1::Snapshot {
            version: 7,
            hash: "liar".into(),
            chains: vec![v1::SnapshotChain {
                name: "c".into(),
                listener: "ingress".into(),
                default_cluster: String::new(),
                filters: vec![v1::SnapshotFilter {
                    name: "basic".into(),
                    digest: digest.clone(),
                    root_id: String::new(),
                    vm_id: String::new(),
                    config_json: "{\"greeting\":\"lied\"}".into(),
                    failure_policy: String::new(),
                }],
            }],
            clusters: vec![],
            listeners: vec![],
        },
        bytes: Arc::new(std::sync::Mutex::new(noop)),
        answers: Default::default(),
    };
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let server = tonic::transport::Server::builder()
        .add_service(v1::discovery_server::DiscoveryServer::new(liar.clone()))
        .add_service(v1::modules_server::ModulesServer::new(liar.clone()))
        .serve_with_incoming(tokio_stream::wrappers::TcpListenerStream::new(listener));
    let server = tokio::spawn(server);

    let dir = tempfile::tempdir().expect("tempdir");
    let up = Upstream::start("svc").await;
    let args = vec![
        "--control".to_owned(),
        addr.to_string(),
        "--id".to_owned(),
        "p".to_owned(),
        "--state-dir".to_owned(),
        dir.path().display().to_string(),
    ];
    let proxy = ProxyProcess::start_args_any(&bootstrap(&[up.address()]), 1, &args).await;
    let answers = liar.answers.clone();
    eventually("the proxy's answer", Duration::from_secs(20), || {
        let answers = answers.clone();
        async move { answers.lock().expect("lock").iter().any(|a| a.version == 7) }
    })
    .await;
    let answer = answers
        .lock()
        .expect("lock")
        .iter()
        .find(|a| a.version == 7)
        .cloned()
        .expect("answer");
    assert!(
        answer.error.contains(&digest) && answer.error.contains("refusing"),
        "a NACK naming the digest: {answer:?}"
    );
    assert_eq!(
        greeting_via(&proxy).await,
        "",
        "the bootstrap config still runs"
    );
    let hex = digest.trim_start_matches("sha256:");
    assert!(
        !dir.path()
            .join("modules")
            .join(format!("{hex}.wasm"))
            .exists(),
        "the lying bytes were not kept"
    );

    // The server mends its ways: the proxy tries the refused snapshot again (after 2 s) and
    // runs it.
    *liar.bytes.lock().expect("lock") = basic;
    let answers = liar.answers.clone();
    eventually("an ACK after the retry", Duration::from_secs(20), || {
        let answers = answers.clone();
        async move {
            answers
                .lock()
                .expect("lock")
                .iter()
                .any(|a| a.version == 7 && a.error.is_empty())
        }
    })
    .await;
    assert_eq!(greeting_via(&proxy).await, "lied");
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_config_resource_changes_every_chain_that_refers_to_it() {
    let dir = tempfile::tempdir().expect("tempdir");
    let control = ControlProcess::start(&dir.path().join("data")).await;
    let up = Upstream::start("svc").await;
    push_basic(&control);
    let greet = |g: &str| {
        format!("kind: FilterConfig\nname: greet\nspec:\n  config: {{ greeting: {g} }}\n")
    };
    let chain = "kind: Chain
name: s1-ingress
selector: { app: s1 }
spec:
  listener: ingress
  filters:
    - { name: basic, module: basic, config_ref: greet }
";
    // A chain cannot refer to a FilterConfig that does not exist.
    let (code, _, err) = control.weftctl_stdin(&["apply", "-f", "-"], Some(chain));
    assert_eq!(code, 1);
    assert!(err.contains("no FilterConfig `greet`"), "{err}");
    apply(&control, &format!("{}---\n{chain}", greet("one")));
    let boot = bootstrap(&[up.address()]);
    let s1 = follower(&control, &boot, 1, "s1-a", "app=s1", &dir.path().join("s1")).await;
    let (code, out, err) = control.weftctl(&["rollout", "status", "--timeout", "30"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(greeting_via(&s1).await, "one");

    // Only the FilterConfig changes: the chain using it follows.
    let out = apply(&control, &greet("two"));
    assert!(out.contains("filterconfig/greet configured"), "{out}");
    let (code, out, err) = control.weftctl(&["rollout", "status", "--timeout", "30"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(greeting_via(&s1).await, "two");
    let (code, out, _) = control.weftctl(&["get", "filterconfigs"]);
    assert_eq!(code, 0);
    assert!(out.contains("greet") && out.contains("two"), "{out}");
    let (code, _, err) = control.weftctl(&["delete", "filterconfig", "greet"]);
    assert_eq!(code, 1);
    assert!(err.contains("used by chain `s1-ingress`"), "{err}");
}

#[test]
fn a_bad_control_address_is_a_startup_error() {
    let dir = tempfile::tempdir().expect("tempdir");
    let config = dir.path().join("proxy.yaml");
    std::fs::write(
        &config,
        render(
            &bootstrap(&["127.0.0.1:9".to_owned()]),
            free_port(),
            free_port(),
        ),
    )
    .expect("write");
    // A bad address; https without the CA to verify it (never plaintext instead).
    for (address, why) in [
        (
            "a b",
            "expected host:port, http://host:port or https://host:port",
        ),
        ("https://127.0.0.1:7070", "is https: give the CA"),
    ] {
        let out = std::process::Command::new(proxy_bin())
            .arg("--config")
            .arg(&config)
            .args(["--control", address])
            .env_remove("WEFT_CONTROL_CA")
            .output()
            .expect("weft-proxy");
        assert_eq!(out.status.code(), Some(2), "{address}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(why), "{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_failing_at_request_time_shows_as_degraded_until_the_next_apply() {
    let dir = tempfile::tempdir().expect("tempdir");
    let control = ControlProcess::start(&dir.path().join("data")).await;
    let up = Upstream::start("svc").await;
    let boot = bootstrap(&[up.address()]);
    let proxy = follower(&control, &boot, 1, "d1-a", "app=d1", &dir.path().join("d1")).await;
    push_basic(&control);
    apply(&control, &basic_chain("d1", "{ greeting: hello }"));
    let rollout = |control: &ControlProcess| {
        let (code, out, err) = control.weftctl(&[
            "rollout",
            "status",
            "--selector",
            "app=d1",
            "--timeout",
            "30",
        ]);
        assert_eq!(code, 0, "{out}{err}");
    };
    rollout(&control);
    assert_eq!(proxy_status(&control, "d1-a")["state"], "ACK");

    // The filter traps on a request (fail_closed: 503): the proxy reports it.
    let got = get(&h1_client(), &proxy.url("/panic")).await.unwrap();
    assert_eq!(got.status, 503, "{got:?}");
    eventually(
        "the proxy to report as degraded",
        Duration::from_secs(10),
        || async { proxy_status(&control, "d1-a")["state"] == "ACK, degraded: basic 1 trap" },
    )
    .await;
    let st = proxy_status(&control, "d1-a");
    assert_eq!(st["failures"][0]["kind"], "trap", "{st}");
    let (_, table, _) = control.weftctl(&["status"]);
    assert!(table.contains("degraded: basic 1 trap"), "{table}");

    // A new apply starts counting afresh.
    apply(&control, &basic_chain("d1", "{ greeting: again }"));
    rollout(&control);
    eventually(
        "the degraded state to clear",
        Duration::from_secs(10),
        || async { proxy_status(&control, "d1-a")["state"] == "ACK" },
    )
    .await;
}

/// Runs `cmd` (openssl) and asserts it worked.
fn run(cmd: &mut std::process::Command) {
    let out = cmd.output().expect("run");
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The module supply chain: a control service with a trusted key stores only modules
/// signed by it; a proxy with the key runs only signed modules, checking again itself — a
/// control service without keys cannot make it run an unsigned one — and files on disk need
/// their `.sig`. One key is OpenSSL's, to show the file formats are the usual ones.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn modules_run_only_when_signed_by_a_trusted_key() {
    let dir = tempfile::tempdir().expect("tempdir");
    let d = dir.path();
    let (trusted, trusted_pub) = (d.join("k1.pem"), d.join("k1.pub.pem"));
    run(std::process::Command::new("openssl")
        .args(["genpkey", "-algorithm", "ed25519", "-out"])
        .arg(&trusted));
    run(std::process::Command::new("openssl")
        .arg("pkey")
        .arg("-in")
        .arg(&trusted)
        .arg("-pubout")
        .arg("-out")
        .arg(&trusted_pub));
    let keyed = ControlProcess::start_with(
        &d.join("keyed"),
        &["--module-trusted-key", trusted_pub.to_str().unwrap()],
    )
    .await;
    let (code, untrusted_id, err) =
        keyed.weftctl(&["module", "keygen", "--out", d.join("k2").to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert!(untrusted_id.starts_with("ed25519:"), "{untrusted_id}");
    let untrusted = d.join("k2.pem");
    let module = guest_filter("compat_basic");
    let push = |control: &ControlProcess, key: Option<&std::path::Path>| {
        let mut args = vec![
            "module".to_owned(),
            "push".to_owned(),
            module.display().to_string(),
            "--name".to_owned(),
            "basic".to_owned(),
        ];
        if let Some(k) = key {
            args.extend(["--sign".to_owned(), k.display().to_string()]);
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        control.weftctl(&args)
    };

    // The control service with a trusted key: unsigned and wrongly signed modules are refused.
    let (code, _, err) = push(&keyed, None);
    assert_eq!(code, 1);
    assert!(err.contains("not signed"), "{err}");
    let (code, _, err) = push(&keyed, Some(&untrusted));
    assert_eq!(code, 1);
    assert!(err.contains("not a trusted key"), "{err}");
    assert!(err.contains(untrusted_id.trim()), "{err}");
    let (code, out, err) = push(&keyed, Some(&trusted));
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("ed25519:"), "the table names the key: {out}");
    let (_, out, _) = keyed.weftctl(&["module", "ls", "-o", "json"]);
    let listed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        listed[0]["verified_by"]
            .as_str()
            .is_some_and(|k| k.starts_with("ed25519:")),
        "{listed}"
    );

    // A proxy with the key runs the signed module.
    let up = Upstream::start("svc").await;
    let boot = bootstrap(&[up.address()]);
    let key_args = |control: &ControlProcess, id: &str| {
        let mut args = control.proxy_args(id, &["app=s1"], &d.join(id));
        args.extend([
            "--module-trusted-key".to_owned(),
            trusted_pub.display().to_string(),
        ]);
        args
    };
    let p1 = ProxyProcess::start_args_any(&boot, 1, &key_args(&keyed, "p1")).await;
    apply(&keyed, &basic_chain("s1", "{ greeting: signed }"));
    let (code, out, err) = keyed.weftctl(&["rollout", "status", "--timeout", "30"]);
    assert_eq!(code, 0, "{out}{err}\n{}", p1.log());
    assert_eq!(greeting_via(&p1).await, "signed");

    // A control service without keys stores an unsigned module; the proxy refuses to run
    // it (NACK naming why) and keeps serving what it had.
    let open = ControlProcess::start(&d.join("open")).await;
    let p2 = ProxyProcess::start_args_any(&boot, 1, &key_args(&open, "p2")).await;
    let (code, _, err) = push(&open, None);
    assert_eq!(code, 0, "{err}");
    apply(&open, &basic_chain("s1", "{ greeting: unsigned }"));
    let (code, out, err) = open.weftctl(&["rollout", "status", "--timeout", "30"]);
    assert_eq!(code, 1, "{out}{err}");
    let st = proxy_status(&open, "p2");
    let nack = st["nack_error"].as_str().unwrap_or_default().to_owned();
    assert!(nack.contains("not signed"), "{st}");
    assert_eq!(greeting_via(&p2).await, "");
    // The same bytes pushed again signed: the proxy fetches the signature and runs them.
    let (code, _, err) = push(&open, Some(&trusted));
    assert_eq!(code, 0, "{err}");
    apply(&open, &basic_chain("s1", "{ greeting: now-signed }"));
    let (code, out, err) = open.weftctl(&["rollout", "status", "--timeout", "30"]);
    assert_eq!(code, 0, "{out}{err}\n{}", p2.log());
    assert_eq!(greeting_via(&p2).await, "now-signed");
    // It kept the bytes it had fetched; only the signature was new.
    assert!(
        p2.log().contains("module signature updated"),
        "{}",
        p2.log()
    );

    // Keys given to a control service later: stored modules are verified again, and a
    // chain can use only those that pass.
    let unsigned = d.join("unsigned.wasm");
    let mut bytes = std::fs::read(&module).unwrap();
    bytes.extend_from_slice(&[0, 2, 1, b'x']); // an empty custom section: other bytes
    std::fs::write(&unsigned, bytes).unwrap();
    let (code, _, err) = open.weftctl(&[
        "module",
        "push",
        unsigned.to_str().unwrap(),
        "--name",
        "other",
    ]);
    assert_eq!(code, 0, "{err}");
    drop(p2);
    drop(open);
    let open = ControlProcess::start_with(
        &d.join("open"),
        &["--module-trusted-key", trusted_pub.to_str().unwrap()],
    )
    .await;
    let (code, _, err) = open.weftctl_stdin(
        &["apply", "-f", "-"],
        Some(&basic_chain("s1", "{ greeting: x }").replace("module: basic", "module: other")),
    );
    assert_eq!(code, 1);
    assert!(err.contains("not signed by a trusted key"), "{err}");
    let (code, _, err) = open.weftctl_stdin(
        &["apply", "-f", "-"],
        Some(&basic_chain("s1", "{ greeting: y }")),
    );
    assert_eq!(code, 0, "the signed module stays usable: {err}");

    // A module file on disk: refused at startup without its `.sig`, run with it.
    let local = d.join("basic.wasm");
    std::fs::copy(&module, &local).unwrap();
    let yaml = crate::chain(
        "svc",
        &[crate::filter("basic", &local, "{ greeting: local }")],
        &[crate::cluster("svc", &[up.address()], "")],
    );
    let keys = vec![
        "--module-trusted-key".to_owned(),
        trusted_pub.display().to_string(),
    ];
    let err = ProxyProcess::try_start_args(&yaml, 1, &keys, free_port(), free_port())
        .await
        .err()
        .expect("an unsigned local module ran");
    assert!(
        err.contains("not signed") && err.contains("basic.wasm"),
        "{err}"
    );
    let (code, _, err) = open.weftctl(&[
        "module",
        "sign",
        local.to_str().unwrap(),
        "--key",
        untrusted.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let err = ProxyProcess::try_start_args(&yaml, 1, &keys, free_port(), free_port())
        .await
        .err()
        .expect("a module signed by an untrusted key ran");
    assert!(err.contains("not a trusted key"), "{err}");
    let (code, _, err) = open.weftctl(&[
        "module",
        "sign",
        local.to_str().unwrap(),
        "--key",
        trusted.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{err}");
    let p3 = ProxyProcess::start_args_any(&yaml, 1, &keys).await;
    assert_eq!(greeting_via(&p3).await, "local");
    // A trusted-key file that is not a public key stops the proxy, naming it.
    let bad = vec![
        "--module-trusted-key".to_owned(),
        trusted.display().to_string(),
    ];
    let err = ProxyProcess::try_start_args(&yaml, 1, &bad, free_port(), free_port())
        .await
        .err()
        .expect("a private key taken as a trusted public key");
    assert!(
        err.contains("k1.pem") && err.contains("exit status: 2"),
        "{err}"
    );
}
