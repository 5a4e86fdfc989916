//! Live services end to end: real `weft-control`, `weftctl` and `weft-proxy` processes on
//! loopback. A proxy whose outbound listener has no default cluster and whose bootstrap has
//! no cluster at all learns services from the control service while traffic flows: a
//! service that registers is callable by name (with or without port and namespace), a
//! Cluster resource changes its settings and endpoints live, a setting the proxy cannot run
//! is NACKed while the last good config serves, and a removed cluster lets its requests in
//! flight finish before its name answers 404 again.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http_body_util::Full;
use weft_tests::*;

use crate::control::{apply, eventually, follower, proxy_status};

/// A bootstrap with one outbound listener routing by authority and no cluster.
fn outbound_only() -> String {
    "admin: { address: \"{admin}\" }
listeners:
  - name: outbound
    address: \"{listen}\"
    direction: outbound
clusters: []
"
    .to_owned()
}

/// The client sidecar of these tests: `client-1`, label `app=client`, two workers, the
/// outbound-only bootstrap, its state under `dir`.
async fn client(control: &ControlProcess, dir: &std::path::Path) -> Arc<ProxyProcess> {
    let state = dir.join("p");
    Arc::new(
        follower(
            control,
            &outbound_only(),
            2,
            "client-1",
            "app=client",
            &state,
        )
        .await,
    )
}

/// `GET path` through `proxy` with `host` as the authority.
async fn call(proxy: &ProxyProcess, host: &str, path: &str) -> Result<Got, String> {
    call_url(&proxy.url(path), host).await
}

/// `GET url` with `host` as the authority.
async fn call_url(url: &str, host: &str) -> Result<Got, String> {
    let req = http::Request::get(url)
        .header(http::header::HOST, host)
        .body(Full::new(Bytes::new()))
        .expect("request");
    send(&h1_client(), req).await
}

/// `weftctl register <service> <address>` with a TTL long enough for the test.
fn register(control: &ControlProcess, service: &str, address: &str) {
    let (code, out, err) = control.weftctl(&["register", service, address, "--ttl", "300"]);
    assert_eq!(code, 0, "register: {out}{err}");
}

/// Clients calling `echo` through the proxy until stopped (bounded to two minutes), each
/// paced at 10 ms; a call fails unless it gets 200 from an upstream named `echo-*`.
struct Calls {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl Calls {
    fn start(proxy: Arc<ProxyProcess>, hosts: &[&'static str]) -> Self {
        let url = proxy.url("/x");
        Self::start_url(&url, hosts)
    }

    /// Calls to `url` (any listener), one client per host.
    fn start_url(url: &str, hosts: &[&'static str]) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (sent, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let tasks = hosts
            .iter()
            .map(|&host| {
                let (url, stop, sent, failed) =
                    (url.to_owned(), stop.clone(), sent.clone(), failed.clone());
                tokio::spawn(async move {
                    let mut tick = tokio::time::interval(Duration::from_millis(10));
                    let deadline = Instant::now() + Duration::from_secs(120);
                    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                        tick.tick().await;
                        sent.fetch_add(1, Ordering::SeqCst);
                        match call_url(&url, host).await {
                            Ok(g)
                                if g.status == 200
                                    && g.header("x-upstream").starts_with("echo-") => {}
                            other => {
                                failed.fetch_add(1, Ordering::SeqCst);
                                eprintln!("failed: {other:?}");
                            }
                        }
                    }
                })
            })
            .collect();
        Self {
            stop,
            sent,
            failed,
            tasks,
        }
    }

    async fn finish(self) -> (usize, usize) {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.tasks {
            t.await.expect("client");
        }
        (
            self.sent.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
        )
    }
}

/// The `/clusters` entry named `name`, if the proxy has it.
async fn cluster_named(proxy: &ProxyProcess, name: &str) -> Option<serde_json::Value> {
    proxy.clusters().await["clusters"]
        .as_array()?
        .iter()
        .find(|c| c["name"] == name)
        .cloned()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_come_and_go_on_a_running_proxy_routed_by_authority_with_no_failed_call() {
    let dir = tempfile::tempdir().expect("tempdir");
    let control = ControlProcess::start(&dir.path().join("data")).await;
    let (a, b) = (
        Upstream::start("echo-a").await,
        Upstream::start("echo-b").await,
    );
    let proxy = client(&control, dir.path()).await;

    // Nothing is known yet: a clear 404 that names the authority.
    let got = call(&proxy, "echo", "/x").await.expect("call");
    assert_eq!(got.status, 404, "{got:?}");
    assert_eq!(
        got.header("x-weft-reason"),
        "no cluster for authority \"echo\""
    );

    // An instance registers: the service is callable by every form of its name, with no
    // bootstrap entry and no restart.
    register(&control, "echo", &a.address());
    let p = &proxy;
    eventually(
        "the echo service on the proxy",
        Duration::from_secs(20),
        || async move { call(p, "echo", "/x").await.is_ok_and(|g| g.status == 200) },
    )
    .await;
    for host in [
        "echo",
        "echo:80",
        "echo.default",
        "echo.default.svc.cluster.local",
        "echo.default.svc.cluster.local:8080",
    ] {
        let got = call(&proxy, host, "/x").await.expect("call");
        assert_eq!(got.status, 200, "{host}: {got:?}");
        assert_eq!(got.header("x-upstream"), "echo-a", "{host}");
    }
    let implicit = cluster_named(&proxy, "echo").await.expect("cluster echo");
    assert_eq!(implicit["lb_policy"], "round_robin", "{implicit}");

    // Under paced calls (three spellings of the name): a Cluster resource takes over the
    // service with its own settings and one more fixed endpoint. No call fails.
    let calls = Calls::start(
        proxy.clone(),
        &["echo", "echo:80", "echo.default.svc.cluster.local"],
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    apply(
        &control,
        &format!(
            "kind: Cluster
name: echo
spec:
  service: echo
  endpoints: [{{address: \"{}\"}}]
  settings:
    lb_policy: least_request
    request_timeout_ms: 3000
    limits: {{max_requests: 500}}
",
            b.address()
        ),
    );
    eventually(
        "the cluster's new settings",
        Duration::from_secs(20),
        || async move {
            cluster_named(p, "echo").await.is_some_and(|c| {
                c["lb_policy"] == "least_request"
                    && c["endpoints"].as_array().is_some_and(|e| e.len() == 2)
            })
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (b0, a0) = (b.hits(), a.hits());
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(b.hits() > b0 && a.hits() > a0, "both endpoints serve");

    // A setting this proxy cannot run (mesh TLS, and it has no identity) is NACKed with the
    // reason; the running cluster keeps serving.
    let version = control.weftctl_stdin(
        &["apply", "-f", "-"],
        Some(
            "kind: Cluster\nname: echo\nspec:\n  service: echo\n  settings: {tls: {mode: mesh}}\n",
        ),
    );
    assert_eq!(version.0, 0, "{version:?}");
    let c = &control;
    eventually("the NACK", Duration::from_secs(20), || async move {
        proxy_status(c, "client-1")["nack_error"]
            .as_str()
            .is_some_and(|e| e.contains("identity"))
    })
    .await;
    assert_eq!(
        cluster_named(&proxy, "echo").await.expect("echo")["lb_policy"],
        "least_request"
    );
    // Back to settings it runs: the proxy takes the snapshot again.
    apply(
        &control,
        "kind: Cluster\nname: echo\nspec:\n  service: echo\n  settings: {lb_policy: random}\n",
    );
    eventually(
        "the random policy",
        Duration::from_secs(20),
        || async move {
            cluster_named(p, "echo")
                .await
                .is_some_and(|c| c["lb_policy"] == "random")
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (sent, failed) = calls.finish().await;
    assert!(sent > 150, "calls sent: {sent}");
    assert_eq!(failed, 0, "{failed} of {sent} calls failed");

    // Settings the control service can tell are wrong never reach a proxy.
    let (code, out, err) = control.weftctl_stdin(
        &["apply", "-f", "-"],
        Some(
            "kind: Cluster\nname: echo\nspec:\n  service: echo\n  settings: {lb_policy: fastest}\n",
        ),
    );
    assert_ne!(code, 0, "{out}");
    assert!(
        err.contains("lb_policy") && err.contains("fastest"),
        "{err}"
    );
    let (code, _, err) = control.weftctl_stdin(
        &["apply", "-f", "-"],
        Some("kind: Cluster\nname: echo\nspec:\n  service: echo\n  settings: {endpoints: []}\n"),
    );
    assert_ne!(code, 0);
    assert!(err.contains("must not set `endpoints`"), "{err}");

    // A removed cluster: a call in flight on it finishes; new calls to its name get 404.
    apply(
        &control,
        &format!(
            "kind: Cluster\nname: slow\nspec:\n  endpoints: [{{address: \"{}\"}}]\n",
            a.address()
        ),
    );
    eventually("cluster slow", Duration::from_secs(20), || async move {
        cluster_named(p, "slow").await.is_some()
    })
    .await;
    let in_flight = {
        let proxy = proxy.clone();
        tokio::spawn(async move { call(&proxy, "slow", "/delay/1500").await })
    };
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (code, out, err) = control.weftctl(&["delete", "cluster", "slow"]);
    assert_eq!(code, 0, "{out}{err}");
    eventually("slow removed", Duration::from_secs(20), || async move {
        cluster_named(p, "slow").await.is_none()
    })
    .await;
    let got = call(&proxy, "slow", "/x").await.expect("call");
    assert_eq!(got.status, 404, "{got:?}");
    let finished = in_flight.await.expect("task").expect("in-flight call");
    assert_eq!(
        finished.status, 200,
        "the call in flight finishes: {finished:?}"
    );
    assert_eq!(finished.header("x-upstream"), "echo-a");

    // The removed cluster's series are no longer exported (the requests counted by the
    // listener stay: the call in flight was counted as it ended).
    let stats = proxy.stats().await;
    let lingering: Vec<&str> = stats
        .lines()
        .filter(|l| l.contains("cluster=\"slow\"") && !l.starts_with("weft_requests_total"))
        .collect();
    assert!(lingering.is_empty(), "{lingering:?}");
    assert!(stats.contains("cluster=\"echo\""), "{stats}");

    // The proxy counted the 404s apart from any cluster.
    assert!(
        metric_value(
            &stats,
            "weft_requests_total{listener=\"outbound\",cluster=\"\",status_class=\"4xx\"}"
        )
        .is_some_and(|n| n >= 2.0),
        "{stats}"
    );
}

/// `weftctl apply` of a Listener `name` with `settings` (YAML flow mapping).
fn apply_listener(control: &ControlProcess, name: &str, settings: &str) {
    apply(
        control,
        &format!("kind: Listener\nname: {name}\nselector: {{app: client}}\nspec: {settings}\n"),
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listeners_are_added_changed_moved_and_removed_live_and_a_removed_one_drains() {
    let dir = tempfile::tempdir().expect("tempdir");
    let control = ControlProcess::start(&dir.path().join("data")).await;
    let a = Upstream::start("echo-a").await;
    register(&control, "echo", &a.address());
    let proxy = client(&control, dir.path()).await;
    let (p1, p2) = (free_port(), free_port());
    let url = |port: u16, path: &str| format!("http://127.0.0.1:{port}{path}");

    // A listener of the control service's: it listens, with no restart, and its default
    // cluster is a service the proxy learned.
    apply_listener(
        &control,
        "extra",
        &format!("{{address: \"127.0.0.1:{p1}\", direction: inbound, default_cluster: echo}}"),
    );
    let u = url(p1, "/x");
    eventually("listener extra", Duration::from_secs(20), || {
        let u = u.clone();
        async move {
            call_url(&u, "anything")
                .await
                .is_ok_and(|g| g.status == 200)
        }
    })
    .await;
    let got = call_url(&url(p1, "/x"), "anything").await.expect("call");
    assert_eq!(got.header("x-upstream"), "echo-a");

    // Its settings change under paced calls: the sockets stay, new connections get the new
    // settings, no call fails.
    let calls = Calls::start_url(&url(p1, "/x"), &["h1", "h2", "h3"]);
    tokio::time::sleep(Duration::from_millis(400)).await;
    apply_listener(
        &control,
        "extra",
        &format!(
            "{{address: \"127.0.0.1:{p1}\", direction: inbound, default_cluster: echo, \
             protocol: http1, idle_timeout_ms: 20000, max_requests_per_connection: 5}}"
        ),
    );
    let px = &proxy;
    eventually("the new settings", Duration::from_secs(20), || async move {
        let (_, dump) = px.admin_get("/config_dump").await.unwrap_or_default();
        let dump: serde_json::Value = serde_json::from_str(&dump).unwrap_or_default();
        dump["config"]["listeners"]
            .as_array()
            .and_then(|l| l.iter().find(|l| l["name"] == "extra").cloned())
            .is_some_and(|l| l["max_requests_per_connection"] == 5)
    })
    .await;
    tokio::time::sleep(Duration::from_millis(400)).await;
    let (sent, failed) = calls.finish().await;
    assert!(sent > 60, "calls sent: {sent}");
    assert_eq!(failed, 0, "{failed} of {sent} calls failed");
    // The new limit holds: the 5th request on a connection is its last.
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", p1))
        .await
        .expect("connect");
    let mut seen = Vec::new();
    use tokio::io::AsyncWriteExt;
    for _ in 0..5 {
        conn.write_all(b"GET /x HTTP/1.1\r\nhost: e\r\n\r\n")
            .await
            .expect("write");
    }
    read_until(&mut conn, &mut seen, "connection: close").await;
    assert_eq!(
        String::from_utf8_lossy(&seen)
            .matches("HTTP/1.1 200")
            .count(),
        5,
        "{}",
        String::from_utf8_lossy(&seen)
    );

    // It moves: the new address listens, the old one closes.
    apply_listener(
        &control,
        "extra",
        &format!("{{address: \"127.0.0.1:{p2}\", default_cluster: echo}}"),
    );
    let u = url(p2, "/x");
    eventually("the new address", Duration::from_secs(20), || {
        let u = u.clone();
        async move { call_url(&u, "e").await.is_ok_and(|g| g.status == 200) }
    })
    .await;
    eventually(
        "the old address closed",
        Duration::from_secs(20),
        || async move {
            tokio::net::TcpStream::connect(("127.0.0.1", p1))
                .await
                .is_err()
        },
    )
    .await;

    // An address another process holds: NACKed with the reason; the listener stays.
    let holder = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let held = holder.local_addr().expect("addr").port();
    apply_listener(
        &control,
        "extra",
        &format!("{{address: \"127.0.0.1:{held}\", default_cluster: echo}}"),
    );
    let c = &control;
    eventually("the NACK", Duration::from_secs(20), || async move {
        proxy_status(c, "client-1")["nack_error"]
            .as_str()
            .is_some_and(|e| e.contains(&format!("127.0.0.1:{held}")) && e.contains("in use"))
    })
    .await;
    let got = call_url(&url(p2, "/x"), "e").await.expect("still serving");
    assert_eq!(got.status, 200);
    drop(holder);

    // Removed while a call is in flight: that call finishes; the address closes.
    apply_listener(
        &control,
        "extra",
        &format!("{{address: \"127.0.0.1:{p2}\", default_cluster: echo}}"),
    );
    eventually("back on p2", Duration::from_secs(20), || async move {
        proxy_status(c, "client-1")["nack_error"]
            .as_str()
            .is_none_or(str::is_empty)
    })
    .await;
    let slow = url(p2, "/delay/1500");
    let in_flight = tokio::spawn(async move { call_url(&slow, "e").await });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (code, out, err) = control.weftctl(&["delete", "listener", "extra"]);
    assert_eq!(code, 0, "{out}{err}");
    eventually("extra closed", Duration::from_secs(20), || async move {
        tokio::net::TcpStream::connect(("127.0.0.1", p2))
            .await
            .is_err()
    })
    .await;
    let finished = in_flight.await.expect("task").expect("the call in flight");
    assert_eq!(finished.status, 200, "{finished:?}");
    // The bootstrap listener served throughout.
    let got = call(&proxy, "echo", "/x").await.expect("call");
    assert_eq!(got.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_scope_narrows_what_a_proxy_receives_to_the_services_it_calls() {
    let dir = tempfile::tempdir().expect("tempdir");
    let control = ControlProcess::start(&dir.path().join("data")).await;
    let a = Upstream::start("echo-a").await;
    for service in ["echo", "billing", "search-1", "search-2", "users"] {
        register(&control, service, &a.address());
    }
    apply(
        &control,
        "kind: Scope\nname: frontend\nselector: {app: frontend}\nspec:\n  services: [echo, search-*]\n",
    );
    let scoped = follower(
        &control,
        &outbound_only(),
        1,
        "fe",
        "app=frontend",
        &dir.path().join("fe"),
    )
    .await;
    let whole = follower(
        &control,
        &outbound_only(),
        1,
        "be",
        "app=backend",
        &dir.path().join("be"),
    )
    .await;
    let cluster_names = |v: serde_json::Value| {
        let mut n: Vec<String> = v["clusters"]
            .as_array()
            .map(|c| {
                c.iter()
                    .filter_map(|c| c["name"].as_str().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        n.sort();
        n
    };
    let (s, w) = (&scoped, &whole);
    eventually(
        "both proxies synced",
        Duration::from_secs(20),
        || async move {
            cluster_names(s.clusters().await).len() == 3
                && cluster_names(w.clusters().await).len() == 5
        },
    )
    .await;
    assert_eq!(
        cluster_names(scoped.clusters().await),
        ["echo", "search-1", "search-2"]
    );
    assert_eq!(
        cluster_names(whole.clusters().await),
        ["billing", "echo", "search-1", "search-2", "users"]
    );
    // Out of scope is out of reach: 404, as for a service that does not exist.
    let got = call(&scoped, "billing", "/x").await.expect("call");
    assert_eq!(got.status, 404, "{got:?}");
    assert_eq!(
        call(&scoped, "search-2", "/x").await.expect("call").status,
        200
    );
    assert_eq!(
        call(&whole, "billing", "/x").await.expect("call").status,
        200
    );

    // A service registering later reaches a scoped proxy only when the scope allows it.
    register(&control, "search-3", &a.address());
    register(&control, "ledger", &a.address());
    eventually(
        "search-3 on the scoped proxy",
        Duration::from_secs(20),
        || async move { cluster_names(s.clusters().await).contains(&"search-3".to_owned()) },
    )
    .await;
    assert!(!cluster_names(scoped.clusters().await).contains(&"ledger".to_owned()));
    // Bad scopes are refused.
    let (code, _, err) = control.weftctl_stdin(
        &["apply", "-f", "-"],
        Some("kind: Scope\nname: bad\nspec:\n  services: []\n"),
    );
    assert_ne!(code, 0);
    assert!(err.contains("at least one service"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_the_control_service_down_serves_persisted_listeners_or_falls_back() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut control = ControlProcess::start(&dir.path().join("data")).await;
    let a = Upstream::start("echo-a").await;
    register(&control, "echo", &a.address());
    let extra = free_port();
    apply_listener(
        &control,
        "extra",
        &format!("{{address: \"127.0.0.1:{extra}\", default_cluster: echo}}"),
    );
    let boot = outbound_only();
    let args = control.proxy_args("client-1", &["app=client"], &dir.path().join("p"));
    let (admin, listen) = (free_port(), free_port());
    let proxy = ProxyProcess::start_args(&boot, 1, &args, admin, listen).await;
    let (code, out, err) = control.weftctl(&["rollout", "status", "--timeout", "30"]);
    assert_eq!(code, 0, "{out}{err}");
    let u = format!("http://127.0.0.1:{extra}/x");
    assert_eq!(call_url(&u, "e").await.expect("call").status, 200);
    drop(proxy);
    control.kill();

    // Restarted with the control service gone: the persisted listener and service serve.
    let proxy = ProxyProcess::start_args(&boot, 1, &args, admin, listen).await;
    assert_eq!(
        call_url(&u, "e").await.expect("call").status,
        200,
        "{}",
        proxy.log()
    );
    assert_eq!(call(&proxy, "echo", "/x").await.expect("call").status, 200);
    drop(proxy);

    // Its port taken meanwhile: the proxy still starts, on its bootstrap, and says why.
    let _holder = std::net::TcpListener::bind(("127.0.0.1", extra)).expect("hold the port");
    let proxy = ProxyProcess::start_args(&boot, 1, &args, admin, listen).await;
    let got = call(&proxy, "echo", "/x").await.expect("call");
    assert_eq!(got.status, 404, "the bootstrap knows no service: {got:?}");
    assert!(
        proxy
            .log()
            .contains("listeners do not bind, starting from the bootstrap config"),
        "{}",
        proxy.log()
    );
}
