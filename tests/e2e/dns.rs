//! DNS discovery against a real DNS server: dnsmasq on loopback, whose records the tests
//! change. A Cluster resource with `dns: name:port` (A records) or `dns: _svc._proto.name`
//! (SRV records) gets what the name resolves to, re-resolved as its TTL (1 s here) runs
//! out; the proxies follow with no failed request; a name that disappears empties the
//! cluster; a dead DNS server keeps the last answer.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use weft_tests::*;

/// A dnsmasq process answering on `127.0.0.1:port` from a hosts file and SRV records,
/// with a TTL of 1 s; killed by PID when dropped.
struct Dnsmasq {
    child: std::process::Child,
    port: u16,
    hosts: PathBuf,
}

impl Dnsmasq {
    /// Starts it on `port` with `hosts` (a hosts file) and `srv` records
    /// (`name,target,port,priority,weight`).
    async fn start(port: u16, hosts: &Path, srv: &[String]) -> Dnsmasq {
        // Debian puts it in /usr/sbin, which not every PATH has.
        let bin = ["/usr/sbin/dnsmasq", "/usr/bin/dnsmasq"]
            .into_iter()
            .find(|p| Path::new(p).exists())
            .unwrap_or("dnsmasq");
        let mut cmd = std::process::Command::new(bin);
        cmd.args([
            "--keep-in-foreground",
            "--conf-file=/dev/null",
            "--no-resolv",
            "--no-hosts",
            "--bind-interfaces",
            "--listen-address=127.0.0.1",
            "--local-ttl=1",
            // Authoritative for mesh.test: a name not in the hosts file is NXDOMAIN.
            "--local=/mesh.test/",
            "--user=root",
            "--pid-file=",
            "--log-facility=-",
        ])
        .arg(format!("--port={port}"))
        .arg(format!("--addn-hosts={}", hosts.display()));
        for r in srv {
            cmd.arg(format!("--srv-host={r}"));
        }
        let child = cmd
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("dnsmasq (the test command installs it: apt-get install dnsmasq-base)");
        let d = Dnsmasq {
            child,
            port,
            hosts: hosts.to_owned(),
        };
        // Up when it answers on TCP.
        let deadline = Instant::now() + Duration::from_secs(10);
        while tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .is_err()
        {
            assert!(Instant::now() < deadline, "dnsmasq did not start");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        d
    }

    fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Replaces the hosts file and makes dnsmasq read it again.
    fn set_hosts(&self, text: &str) {
        std::fs::write(&self.hosts, text).unwrap();
        let ok = std::process::Command::new("kill")
            .args(["-HUP", &self.child.id().to_string()])
            .status()
            .unwrap()
            .success();
        assert!(ok);
    }
}

impl Drop for Dnsmasq {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A proxy whose cluster `svc` has no endpoints of its own: they come from the control
/// service. Weighted round robin, so that SRV weights show.
fn bootstrap() -> String {
    "admin: { address: \"{admin}\" }
listeners:
  - name: ingress
    address: \"{listen}\"
    default_cluster: svc
clusters:
  - name: svc
    lb_policy: weighted
    endpoints: []
"
    .to_owned()
}

/// A control service resolving with `dns`, and a proxy following it.
async fn control_and_proxy(d: &Path, dns: &Dnsmasq) -> (ControlProcess, ProxyProcess) {
    let control = ControlProcess::start_with(
        &d.join("control"),
        &["--dns-server", &dns.addr().to_string()],
    )
    .await;
    let proxy =
        ProxyProcess::start_args_any(&bootstrap(), 1, &control.proxy_args("p", &[], &d.join("p")))
            .await;
    (control, proxy)
}

fn cluster(dns: &str) -> String {
    format!("kind: Cluster\nname: svc\nspec:\n  dns: \"{dns}\"\n")
}

/// Which upstream answered a request through `proxy` ("" when none did), and the status.
async fn who(proxy: &ProxyProcess) -> (u16, String) {
    match get(&h1_client(), &proxy.url("/dns")).await {
        Ok(g) => (
            g.status,
            g.headers
                .get("x-upstream")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
                .to_owned(),
        ),
        Err(e) => (0, e.to_string()),
    }
}

/// Polls until `want` holds of the answers (at most 20 s); the answers seen meanwhile.
async fn until_answers(
    proxy: &ProxyProcess,
    want: impl Fn(&(u16, String)) -> bool,
) -> Vec<(u16, String)> {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut seen = Vec::new();
    loop {
        let got = who(proxy).await;
        let ok = want(&got);
        seen.push(got);
        if ok {
            return seen;
        }
        assert!(
            Instant::now() < deadline,
            "never: {:?}",
            &seen[seen.len().saturating_sub(5)..]
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clusters_follow_a_dns_name_as_its_records_change() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    // Two upstreams on one port of two loopback addresses: the A records pick between them.
    let two = Upstream::start_at("two", SocketAddr::from(([127, 0, 0, 2], 0))).await;
    let port = two.addr.port();
    let three = Upstream::start_at("three", SocketAddr::from(([127, 0, 0, 3], port))).await;
    let hosts = d.join("hosts");
    std::fs::write(&hosts, "127.0.0.2 echo.mesh.test\n").unwrap();
    let dns = Dnsmasq::start(free_port(), &hosts, &[]).await;
    let (control, proxy) = control_and_proxy(d, &dns).await;
    assert_eq!(who(&proxy).await.0, 503, "no endpoints yet");

    // A bad name is refused when applied.
    let (code, _, err) =
        control.weftctl_stdin(&["apply", "-f", "-"], Some(&cluster("echo.mesh.test")));
    assert_eq!(code, 1);
    assert!(err.contains("needs a port"), "{err}");

    let (code, _, err) = control.weftctl_stdin(
        &["apply", "-f", "-"],
        Some(&cluster(&format!("echo.mesh.test:{port}"))),
    );
    assert_eq!(code, 0, "{err}");
    until_answers(&proxy, |a| *a == (200, "two".into())).await;
    let (_, table, _) = control.weftctl(&["get", "clusters"]);
    assert!(table.contains(&format!("echo.mesh.test:{port}")), "{table}");

    // The record moves to the other address: traffic follows, without a failed request.
    let traffic = {
        let url = proxy.url("/steady");
        tokio::spawn(async move {
            let client = h1_client();
            let mut failed = Vec::new();
            let mut seen = std::collections::BTreeSet::new();
            for _ in 0..400 {
                match get(&client, &url).await {
                    Ok(g) if g.status == 200 => {
                        seen.insert(g.headers["x-upstream"].to_str().unwrap().to_owned());
                    }
                    other => failed.push(format!("{other:?}")),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            (seen, failed)
        })
    };
    tokio::time::sleep(Duration::from_millis(500)).await;
    dns.set_hosts("127.0.0.3 echo.mesh.test\n");
    until_answers(&proxy, |a| *a == (200, "three".into())).await;
    let (seen, failed) = traffic.await.unwrap();
    assert!(failed.is_empty(), "{failed:?}");
    assert!(seen.contains("two") && seen.contains("three"), "{seen:?}");

    // Both records: both serve.
    dns.set_hosts("127.0.0.2 echo.mesh.test\n127.0.0.3 echo.mesh.test\n");
    let seen = until_answers(&proxy, |a| a.1 == "two").await;
    assert!(seen.iter().any(|a| a.1 == "three"));
    assert!(seen.iter().all(|a| a.0 == 200), "{seen:?}");

    // The server dies: the last answer stays while resolutions fail, well past the TTL.
    let dead = dns.addr();
    drop(dns);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut failures_logged = 0;
    while failures_logged < 2 {
        assert!(
            Instant::now() < deadline,
            "no failed resolution logged:\n{}",
            control.log()
        );
        assert_eq!(who(&proxy).await.0, 200);
        failures_logged = control.log().matches("keeping the last answer").count();
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    for _ in 0..10 {
        assert_eq!(who(&proxy).await.0, 200);
    }
    // The control service restarts while DNS is still down: it starts from the answer it
    // kept, so the proxy (reconnected, resynced) keeps its endpoints.
    let port_c = control.addr.port();
    drop(control);
    let control = ControlProcess::start_full(
        &d.join("control"),
        port_c,
        None,
        &["--dns-server", &dead.to_string()],
    )
    .await;
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let (_, out, _) = control.weftctl(&["status", "-o", "json"]);
        if out.contains("\"connected\": true") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the proxy did not reconnect: {out}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (code, out, err) = control.weftctl(&["rollout", "status", "--timeout", "30"]);
    assert_eq!(code, 0, "{out}{err}\n{}", proxy.log());
    for _ in 0..20 {
        assert_eq!(who(&proxy).await.0, 200, "{}", control.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // It comes back without the name: the cluster is emptied (503, no healthy upstream).
    std::fs::write(&hosts, "127.0.0.9 other.mesh.test\n").unwrap();
    let _dns = Dnsmasq::start(dead.port(), &hosts, &[]).await;
    until_answers(&proxy, |a| a.0 == 503).await;
    drop((two, three));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn srv_records_give_ports_and_weights() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let (a, b) = (Upstream::start("a").await, Upstream::start("b").await);
    let hosts = d.join("hosts");
    std::fs::write(&hosts, "127.0.0.1 a.mesh.test\n127.0.0.1 b.mesh.test\n").unwrap();
    let srv = |records: &[(&str, u16, u16)]| -> Vec<String> {
        records
            .iter()
            .map(|(target, port, weight)| {
                format!("_http._tcp.echo.mesh.test,{target},{port},0,{weight}")
            })
            .collect()
    };
    let port = free_port();
    let dns = Dnsmasq::start(port, &hosts, &srv(&[("a.mesh.test", a.addr.port(), 1)])).await;
    let (control, proxy) = control_and_proxy(d, &dns).await;
    let (code, _, err) = control.weftctl_stdin(
        &["apply", "-f", "-"],
        Some(&cluster("_http._tcp.echo.mesh.test")),
    );
    assert_eq!(code, 0, "{err}");
    until_answers(&proxy, |x| *x == (200, "a".into())).await;

    // The SRV set changes (dnsmasq restarted with other records): b joins with weight 3.
    drop(dns);
    let _dns = Dnsmasq::start(
        port,
        &hosts,
        &srv(&[
            ("a.mesh.test", a.addr.port(), 1),
            ("b.mesh.test", b.addr.port(), 3),
        ]),
    )
    .await;
    until_answers(&proxy, |x| *x == (200, "b".into())).await;
    let snapshot_weights = {
        let (_, dump) = proxy.admin_get("/clusters").await.unwrap();
        dump
    };
    assert!(
        snapshot_weights.contains(&b.addr.to_string()),
        "{snapshot_weights}"
    );
    let (mut na, mut nb) = (0, 0);
    for _ in 0..200 {
        match who(&proxy).await {
            (200, w) if w == "a" => na += 1,
            (200, w) if w == "b" => nb += 1,
            other => panic!("{other:?}"),
        }
    }
    assert!(nb > na * 2, "weights 1 and 3: a {na}, b {nb}");
}

/// Two control replicas on etcd: only the elected one resolves DNS names, and the other's
/// proxies get its answers through the store; when the elected one dies, the other is
/// elected and resolves, and its proxies follow the records again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_elected_replica_resolves_and_another_takes_over_when_it_dies() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let two = Upstream::start_at("two", SocketAddr::from(([127, 0, 0, 2], 0))).await;
    let port = two.addr.port();
    let three = Upstream::start_at("three", SocketAddr::from(([127, 0, 0, 3], port))).await;
    let hosts = d.join("hosts");
    std::fs::write(&hosts, "127.0.0.2 echo.mesh.test\n").unwrap();
    let dns = Dnsmasq::start(free_port(), &hosts, &[]).await;
    let etcd = Etcd::start(&d.join("etcd")).await;
    let store = format!("etcd://{}/dns", etcd.client);
    let server = dns.addr().to_string();
    let args = ["--store", store.as_str(), "--dns-server", server.as_str()];
    let mut a = ControlProcess::start_with(&d.join("a"), &args).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !a.log().contains("elected to do singleton work") {
        assert!(Instant::now() < deadline, "A never elected:\n{}", a.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let b = ControlProcess::start_with(&d.join("b"), &args).await;
    // The proxy follows B alone: what A resolves reaches it through etcd.
    let proxy =
        ProxyProcess::start_args_any(&bootstrap(), 1, &b.proxy_args("p", &[], &d.join("p"))).await;
    let (code, _, err) = b.weftctl_stdin(
        &["apply", "-f", "-"],
        Some(&cluster(&format!("echo.mesh.test:{port}"))),
    );
    assert_eq!(code, 0, "{err}");
    until_answers(&proxy, |a| *a == (200, "two".into())).await;
    assert!(a.log().contains("DNS answer changed"), "{}", a.log());
    assert!(!b.log().contains("DNS answer changed"), "{}", b.log());

    // A dies without a word: B is elected once A's lease runs out, resolves, and its
    // proxy follows the record's move.
    a.kill();
    let killed = Instant::now();
    dns.set_hosts("127.0.0.3 echo.mesh.test\n");
    until_answers(&proxy, |a| *a == (200, "three".into())).await;
    eprintln!(
        "DNS followed again {} ms after the elected replica died",
        killed.elapsed().as_millis()
    );
    assert!(
        b.log().contains("elected to do singleton work"),
        "{}",
        b.log()
    );
    drop((two, three, etcd));
}
