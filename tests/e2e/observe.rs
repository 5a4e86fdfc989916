//! Seeing the mesh end to end: real `weft-control`, `weftctl` and two `weft-proxy` sidecars
//! (a caller's outbound, a service's inbound) on loopback, with the standard router pushed
//! from the control service. The proxies report their traffic; `weftctl stat` and `top`
//! show the numbers the test sent: requests, failures, latency, per service, route, edge
//! and proxy; and so does the web dashboard, loaded in a real headless Chromium (its
//! screenshot is left in `target/e2e-output/dashboard.png`).

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::Value;
use weft_tests::*;

use crate::control::{apply, eventually, proxy_status};

/// The service's sidecar: an inbound listener to its local app.
fn inbound(app: &Upstream) -> String {
    format!(
        "admin: {{ address: \"{{admin}}\" }}
listeners:
  - name: inbound
    address: \"{{listen}}\"
    direction: inbound
    default_cluster: local
clusters:
  - {{ name: local, endpoints: [ {{ address: \"{}\" }} ] }}
",
        app.address()
    )
}

/// The caller's sidecar: an outbound listener, the service `api` behind its sidecar.
fn outbound(api_sidecar: &ProxyProcess) -> String {
    format!(
        "admin: {{ address: \"{{admin}}\" }}
wasm: {{ cache_dir: \"{}\" }}
listeners:
  - name: outbound
    address: \"{{listen}}\"
    direction: outbound
clusters:
  - {{ name: api, endpoints: [ {{ address: \"{}\" }} ] }}
",
        shared_module_cache().display(),
        api_sidecar.addr
    )
}

/// The caller's chain: the standard router, with named routes.
const CHAIN: &str = r#"kind: Chain
name: web-outbound
selector: { app: web }
spec:
  listener: outbound
  filters:
    - name: router
      module: router
      config:
        routes:
          - { name: slow, match: { path: { prefix: "/delay/" } }, cluster: api }
          - { name: status, match: { path: { prefix: "/status/" } }, cluster: api }
"#;

/// `weftctl stat KIND -o json`: its rows.
fn stat(control: &ControlProcess, kind: &str) -> Vec<Value> {
    let (code, out, err) = control.weftctl(&["stat", kind, "-o", "json"]);
    assert_eq!(code, 0, "weftctl stat {kind}: {out}{err}");
    let v: Value = serde_json::from_str(&out).expect("stat json");
    v["rows"].as_array().cloned().unwrap_or_default()
}

fn row<'a>(rows: &'a [Value], key: &[(&str, &str)]) -> &'a Value {
    rows.iter()
        .find(|r| key.iter().all(|(k, v)| r[*k] == *v))
        .unwrap_or_else(|| panic!("no row {key:?} in {rows:#?}"))
}

fn n(v: &Value, field: &str) -> f64 {
    v[field]
        .as_f64()
        .unwrap_or_else(|| panic!("{field} in {v}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weftctl_stat_and_top_show_the_traffic_the_proxies_carried() {
    let dir = tempfile::tempdir().expect("tempdir");
    let dashboard = SocketAddr::from(([127, 0, 0, 1], free_port()));
    let dashboard_arg = dashboard.to_string();
    let control = ControlProcess::start_full(
        &dir.path().join("data"),
        free_port(),
        Some(TOKEN),
        &["--dashboard", &dashboard_arg],
    )
    .await;
    let app = Upstream::start("api").await;
    let report = [
        "--report-interval-ms".to_owned(),
        "300".to_owned(),
        "--control-token-file".to_owned(),
        token_file(dir.path()),
    ];
    let mut args = control.proxy_args("api-1", &["app=api"], &dir.path().join("api"));
    args.extend(report.clone());
    let api = ProxyProcess::start_args_any(&inbound(&app), 1, &args).await;
    let mut args = control.proxy_args("web-1", &["app=web"], &dir.path().join("web"));
    args.extend(report);
    let web = ProxyProcess::start_args_any(&outbound(&api), 1, &args).await;
    let router = standard_filter("weft_filter_router");
    let (code, out, err) = control.weftctl(&[
        "module",
        "push",
        router.to_str().expect("path"),
        "--name",
        "router",
    ]);
    assert_eq!(code, 0, "push: {out}{err}");
    apply(&control, CHAIN);
    let (code, out, err) = control.weftctl(&["rollout", "status", "--timeout", "30"]);
    assert_eq!(code, 0, "rollout: {out}{err}\n{}", web.log());

    // Through the caller's sidecar: 30 slow (30 ms), 30 fine and 20 failing requests.
    let client = h1_client();
    let mut sent = 0;
    for (path, times, want) in [
        ("/delay/30", 30, 200),
        ("/status/200", 30, 200),
        ("/status/503", 20, 503),
    ] {
        for _ in 0..times {
            let got = get(&client, &web.url(path)).await.expect("request");
            assert_eq!(got.status, want, "{path}: {got:?}");
            sent += 1;
        }
    }
    // And 10 straight to the service's sidecar, from a caller without one.
    for _ in 0..10 {
        let got = get(&client, &api.url("/status/200"))
            .await
            .expect("request");
        assert_eq!(got.status, 200);
    }

    // The reports come every 300 ms.
    eventually(
        "the reports of every request",
        Duration::from_secs(20),
        || async {
            let services = stat(&control, "services");
            let edges = stat(&control, "edges");
            services
                .iter()
                .any(|r| r["service"] == "api" && r["requests"] == sent + 10)
                && edges.iter().any(|r| r["requests"] == sent)
        },
    )
    .await;

    // The service, as its own sidecar saw it: every request, whoever sent it.
    let services = stat(&control, "services");
    assert_eq!(
        services.len(),
        1,
        "one service carried traffic: {services:#?}"
    );
    let api_row = row(&services, &[("service", "api")]);
    assert_eq!(api_row["failures"], 20, "{api_row}");
    let success = n(api_row, "success_rate");
    assert!((success - 70.0 / 90.0).abs() < 1e-9, "{api_row}");
    assert!(n(api_row, "rps") > 0.0, "{api_row}");
    // 60 of 90 answer at once, 30 after 30 ms: the median is fast, the tail is not.
    assert!(n(api_row, "p50_ms") < 20.0, "{api_row}");
    assert!(n(api_row, "p95_ms") >= 25.0, "{api_row}");
    assert!(n(api_row, "p99_ms") < 1000.0, "{api_row}");

    // The edge, as the caller's sidecar saw it.
    let edges = stat(&control, "edges");
    assert_eq!(edges.len(), 1, "{edges:#?}");
    let edge = row(&edges, &[("source", "web"), ("destination", "api")]);
    assert_eq!(edge["failures"], 20, "{edge}");
    assert!(
        (n(edge, "success_rate") - 60.0 / 80.0).abs() < 1e-9,
        "{edge}"
    );

    // Routes, named by the caller's router.
    let routes = stat(&control, "routes");
    let slow = row(&routes, &[("service", "api"), ("route", "slow")]);
    assert_eq!(
        (slow["requests"].as_u64(), slow["failures"].as_u64()),
        (Some(30), Some(0))
    );
    assert!(n(slow, "p50_ms") >= 25.0, "{slow}");
    let status = row(&routes, &[("service", "api"), ("route", "status")]);
    assert_eq!(
        (status["requests"].as_u64(), status["failures"].as_u64()),
        (Some(50), Some(20))
    );
    assert!((n(status, "success_rate") - 0.6).abs() < 1e-9, "{status}");

    // Per proxy: each counts what crossed it.
    let proxies = stat(&control, "proxies");
    assert_eq!(row(&proxies, &[("proxy", "api-1")])["requests"], sent + 10);
    assert_eq!(row(&proxies, &[("proxy", "web-1")])["requests"], sent);

    // What each proxy runs, from its reports.
    let st = proxy_status(&control, "web-1");
    assert!(st["last_report_ms"].as_u64() > Some(0), "{st}");
    let filters = st["filters"].as_array().expect("filters");
    assert_eq!(filters.len(), 1, "{st}");
    assert_eq!(filters[0]["filter"], "router");
    assert!(
        filters[0]["digest"]
            .as_str()
            .is_some_and(|d| d.starts_with("sha256:")),
        "{st}"
    );

    // The table: `stat` and one refresh of `top`.
    let (code, out, err) = control.weftctl(&["stat", "routes"]);
    assert_eq!(code, 0, "{err}");
    let header = out.lines().next().unwrap_or_default();
    assert!(
        header.starts_with("SERVICE") && header.contains("P99"),
        "{out}"
    );
    assert!(
        out.lines()
            .any(|l| l.starts_with("api") && l.contains("slow")),
        "{out}"
    );
    let (code, out, err) = control.weftctl(&["top", "--iterations", "1", "--interval", "1"]);
    assert_eq!(code, 0, "{err}");
    for needle in ["SERVICES", "EDGES", "ROUTES", "77.78%", "75.00%"] {
        assert!(out.contains(needle), "`{needle}` in:\n{out}");
    }
    assert!(
        out.lines()
            .any(|l| l.starts_with("web") && l.contains("api")),
        "the edge in:\n{out}"
    );

    // A kind that is not one is a usage error naming the ones that are.
    let (code, out, err) = control.weftctl(&["stat", "nodes"]);
    assert_eq!(code, 2, "{out}{err}");
    assert!(err.contains("services"), "{err}");

    // The dashboard: its data behind the token, its page in a real browser.
    let raw = raw_request(
        dashboard,
        b"GET /api/overview HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n",
    )
    .await
    .expect("dashboard");
    assert_eq!(status_of(&raw), 401, "{raw}");
    let raw = raw_request(
        dashboard,
        format!(
            "GET /api/overview?window=120 HTTP/1.1\r\nhost: x\r\nauthorization: Bearer {TOKEN}\r\nconnection: close\r\n\r\n"
        )
        .as_bytes(),
    )
    .await
    .expect("dashboard");
    assert_eq!(status_of(&raw), 200, "{raw}");
    let url = format!("http://{dashboard}/#token={TOKEN}");
    let dom = chromium(dir.path(), &["--dump-dom", &url]);
    let service = tag(&dom, r#"data-service="api""#);
    assert!(service.contains(r#"data-requests="90""#), "{service}");
    assert!(service.contains(r#"data-failures="20""#), "{service}");
    let edge = tag(&dom, r#"data-edge="web-&gt;api""#);
    assert!(edge.contains(r#"data-requests="80""#), "{edge}");
    assert!(edge.contains(r#"data-success="0.7500""#), "{edge}");
    assert!(
        tag(&dom, r#"data-node="web""#).contains("<g"),
        "the caller is drawn"
    );
    let route = tag(&dom, r#"data-route="api/slow""#);
    assert!(route.contains(r#"data-requests="30""#), "{route}");
    let proxy = tag(&dom, r#"data-proxy="web-1""#);
    assert!(proxy.contains(r#"data-connected="true""#), "{proxy}");
    assert!(dom.contains("router"), "the running filters are listed");
    // A page without the token asks for it and shows no data.
    let dom = chromium(dir.path(), &["--dump-dom", &format!("http://{dashboard}/")]);
    assert!(!dom.contains("data-service="), "no data without the token");
    assert!(dom.contains("token needed"), "{dom}");
    // A screenshot for a person to look at.
    let out = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/e2e-output");
    std::fs::create_dir_all(&out).expect("output dir");
    let shot = out.join("dashboard.png");
    let _ = std::fs::remove_file(&shot);
    chromium(
        dir.path(),
        &[
            &format!("--screenshot={}", shot.display()),
            "--window-size=1400,2200",
            &url,
        ],
    );
    let png = std::fs::read(&shot).expect("the screenshot");
    assert!(
        png.starts_with(b"\x89PNG") && png.len() > 20_000,
        "{} bytes",
        png.len()
    );
    drop(web);
    drop(api);
}

const TOKEN: &str = "observe-token";

/// A file holding [`TOKEN`], for the proxies.
fn token_file(dir: &std::path::Path) -> String {
    let path = dir.join("token");
    std::fs::write(&path, TOKEN).expect("token file");
    path.display().to_string()
}

/// Runs headless Chromium with `args` (its page's scripts given five seconds of virtual
/// time); its stdout.
fn chromium(dir: &std::path::Path, args: &[&str]) -> String {
    let profile = tempfile::tempdir_in(dir).expect("profile dir");
    let out = std::process::Command::new("chromium")
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--no-first-run",
            "--hide-scrollbars",
            "--virtual-time-budget=5000",
        ])
        .arg(format!("--user-data-dir={}", profile.path().display()))
        .args(args)
        .output()
        .expect("chromium (the Debian package `chromium`)");
    assert!(
        out.status.success(),
        "chromium: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// The opening tag of the element with `attr` in `dom`.
fn tag<'a>(dom: &'a str, attr: &str) -> &'a str {
    let at = dom
        .find(attr)
        .unwrap_or_else(|| panic!("no element with {attr} in the page:\n{dom}"));
    let start = dom[..at].rfind('<').expect("tag start");
    let end = at + dom[at..].find('>').expect("tag end");
    &dom[start..=end]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weftctl_tap_samples_the_selected_proxies_requests_at_the_rate_asked() {
    let dir = tempfile::tempdir().expect("tempdir");
    let control = ControlProcess::start(&dir.path().join("data")).await;
    let up = Upstream::start("svc").await;
    let boot = crate::control::bootstrap(&[up.address()]);
    let mut proxies = Vec::new();
    for app in ["a", "b"] {
        let args = control.proxy_args(
            &format!("{app}-1"),
            &[&format!("app={app}")],
            &dir.path().join(app),
        );
        proxies.push(ProxyProcess::start_args_any(&boot, 1, &args).await);
    }
    let (code, out, err) = control.weftctl(&["rollout", "status", "--timeout", "30"]);
    assert_eq!(code, 0, "{out}{err}");
    // Nobody to tap: a clear error.
    let (code, _, err) = control.weftctl(&["tap", "--selector", "app=nobody"]);
    assert_eq!(code, 1);
    assert!(err.contains("no connected proxy matches"), "{err}");

    // Tap a's requests under /tapped, 5 a second, until 8 came.
    let mut tap = std::process::Command::new(workspace_bin("weftctl"))
        .args([
            "--server",
            &control.url(),
            "tap",
            "--selector",
            "app=a",
            "--path",
            "/tapped",
        ])
        .args([
            "--max-rps",
            "5",
            "--count",
            "8",
            "--duration",
            "30",
            "-o",
            "json",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("weftctl tap");
    // Traffic to both proxies, tapped paths and others, until the tap has its samples
    // (bounded: 20 s).
    let client = h1_client();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while tap.try_wait().expect("wait").is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "the tap got no 8 samples in 20 s"
        );
        for (proxy, path) in [
            (&proxies[0], "/tapped/x?q=1"),
            (&proxies[0], "/other"),
            (&proxies[1], "/tapped/y"),
        ] {
            let got = get(&client, &proxy.url(path)).await.expect("request");
            assert_eq!(got.status, 200);
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let out = tap.wait_with_output().expect("weftctl tap");
    let (stdout, stderr) = (
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
    );
    assert!(out.status.success(), "{stdout}{stderr}");
    let samples: Vec<Value> = stdout
        .lines()
        .map(|l| serde_json::from_str(l).expect("a JSON line"))
        .collect();
    assert_eq!(samples.len(), 8, "{stdout}");
    for s in &samples {
        assert_eq!(s["proxy"], "a-1", "only the selected proxy: {s}");
        assert_eq!(s["path"], "/tapped/x?q=1", "only the tapped path: {s}");
        assert_eq!(
            (s["method"].as_str(), s["status"].as_u64()),
            (Some("GET"), Some(200))
        );
        assert_eq!(s["destination"], "svc", "{s}");
        assert!(
            s["source"]
                .as_str()
                .is_some_and(|a| a.starts_with("127.0.0.1:")),
            "{s}"
        );
        assert!(s["latency_ms"].as_f64() > Some(0.0), "{s}");
    }
    // A hundred tapped requests a second, 5 samples a second: the 8 span well over half a
    // second (a burst of 5, then one every 200 ms).
    let at: Vec<u64> = samples.iter().filter_map(|s| s["at_ms"].as_u64()).collect();
    let span = at.iter().max().unwrap() - at.iter().min().unwrap();
    assert!(
        span >= 500,
        "8 samples within {span} ms: the rate limit did not hold"
    );
}
