//! The control service's state in a real etcd (`weft-control --store etcd://...`): what one
//! control service stored is there for another started on another data dir after it died;
//! one service per prefix; modules larger than etcd's request limit go in chunks.

use std::path::Path;
use std::time::{Duration, Instant};

use weft_tests::*;

/// `module` with a custom section of `extra` bytes appended: still a valid module, which
/// the service accepts, but larger than one etcd request may be.
fn padded_module(module: &Path, extra: usize) -> Vec<u8> {
    let mut bytes = std::fs::read(module).unwrap();
    let name = b"weft-padding";
    let mut payload = vec![name.len() as u8];
    payload.extend_from_slice(name);
    payload.extend((0..extra).map(|i| (i % 251) as u8));
    bytes.push(0); // custom section
    let mut size = payload.len();
    loop {
        let byte = (size & 0x7f) as u8;
        size >>= 7;
        if size == 0 {
            bytes.push(byte);
            break;
        }
        bytes.push(byte | 0x80);
    }
    bytes.extend(payload);
    bytes
}

/// Starts a control service on `store`, retrying while the previous one's writer lease
/// (10 s) runs out.
async fn control_on(dir: &Path, store: &str) -> ControlProcess {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        match ControlProcess::try_start(dir, &["--store", store]).await {
            Ok(c) => return c,
            Err(log) if log.contains("another control service") && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
            Err(log) => panic!("weft-control on {store}:\n{log}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_service_on_etcd_finds_everything_another_one_stored() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let etcd = Etcd::start(&d.join("etcd")).await;
    let store = format!("etcd://{}/weft-test", etcd.client);

    let mut first = control_on(&d.join("first"), &store).await;
    // One control service per prefix: a second one is refused, naming the first.
    let err = ControlProcess::try_start(&d.join("second"), &["--store", &store])
        .await
        .err()
        .expect("a second control service on the prefix");
    assert!(err.contains("another control service"), "{err}");

    // A module of 2.5 MiB (three chunks), a chain, a cluster, an instance, a join token.
    let big = d.join("big.wasm");
    std::fs::write(&big, padded_module(&guest_filter("compat_basic"), 5 << 19)).unwrap();
    let (code, _, err) =
        first.weftctl(&["module", "push", big.to_str().unwrap(), "--name", "basic"]);
    assert_eq!(code, 0, "{err}");
    let manifest = "kind: Chain
name: s1-ingress
selector: { app: s1 }
spec:
  listener: ingress
  filters:
    - { name: basic, module: basic, config: { greeting: from-etcd } }
---
kind: Cluster
name: svc
spec:
  service: svc
";
    let (code, _, err) = first.weftctl_stdin(&["apply", "-f", "-"], Some(manifest));
    assert_eq!(code, 0, "{err}");
    let up = Upstream::start("svc").await;
    let (code, _, err) = first.weftctl(&["register", "svc", &up.address(), "--ttl", "3600"]);
    assert_eq!(code, 0, "{err}");
    let (code, token, err) = first.weftctl(&["identity", "token", "--service-account", "s1"]);
    assert_eq!(code, 0, "{err}");
    let token_file = d.join("s1.token");
    std::fs::write(&token_file, token.trim()).unwrap();

    // The first service dies without a word (its lease runs out); another, on an empty
    // data dir of its own, serves what it stored.
    first.kill();
    let second = control_on(&d.join("second"), &store).await;
    let (_, listed, _) = second.weftctl(&["module", "ls", "-o", "json"]);
    assert!(listed.contains("\"basic\""), "{listed}");
    let fetched = d.join("fetched.wasm");
    let (code, _, err) =
        second.weftctl(&["module", "get", "basic", "-f", fetched.to_str().unwrap()]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        std::fs::read(&fetched).unwrap(),
        std::fs::read(&big).unwrap()
    );
    let (_, status, _) = second.weftctl(&["status", "-o", "json"]);
    assert!(
        status.contains("\"version\": 1") || status.contains("\"version\":1"),
        "{status}"
    );

    // A proxy following the second service runs the chain and reaches the registered
    // instance, with its identity from the join token minted by the first.
    let boot = "admin: { address: \"{admin}\" }
identity: { token_file: \"TOKEN\" }
listeners:
  - name: ingress
    address: \"{listen}\"
    default_cluster: svc
clusters:
  - name: svc
    endpoints: []
"
    .replace("TOKEN", token_file.to_str().unwrap());
    let proxy = ProxyProcess::start_args(
        &boot,
        1,
        &second.proxy_args("p", &["app=s1"], &d.join("p")),
        free_port(),
        free_port(),
    )
    .await;
    let (code, out, err) = second.weftctl(&["rollout", "status", "--timeout", "30"]);
    assert_eq!(code, 0, "{out}{err}\n{}", proxy.log());
    let got = get(&h1_client(), &proxy.url("/x")).await.unwrap();
    assert_eq!(got.status, 200, "{got:?}");
    // The filter reports the upstream it saw: the instance registered through the first.
    assert_eq!(
        got.headers["x-wasm-upstream"],
        up.address().as_str(),
        "{got:?}"
    );
    assert_eq!(crate::reload::greeting(&got), "from-etcd", "{got:?}");
    // The token was redeemed once, in etcd: a second proxy with it is refused.
    let err = ProxyProcess::try_start_args(
        &boot,
        1,
        &second.proxy_args("q", &[], &d.join("q")),
        free_port(),
        free_port(),
    )
    .await
    .err()
    .expect("a join token redeemed twice");
    assert!(err.contains("already used"), "{err}");
    drop(etcd);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_etcd_stops_the_control_service_at_startup_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let err = ControlProcess::try_start(
        &dir.path().join("c"),
        &["--store", &format!("etcd://127.0.0.1:{port}")],
    )
    .await
    .err()
    .expect("a control service without its etcd");
    assert!(
        err.contains(&format!("etcd at http://127.0.0.1:{port}")),
        "{err}"
    );
    let err = ControlProcess::try_start(&dir.path().join("d"), &["--store", "redis://x"])
        .await
        .err()
        .expect("a store URL that is not etcd");
    assert!(err.contains("use etcd://"), "{err}");
}

/// A standby `weft-control` (nothing listens until it holds the prefix), killed by PID
/// when dropped.
struct Standby {
    child: std::process::Child,
    addr: std::net::SocketAddr,
    log: std::path::PathBuf,
}

impl Standby {
    fn start(dir: &Path, store: &str) -> Standby {
        let addr = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
        let log = dir.with_extension("log");
        let child = std::process::Command::new(workspace_bin("weft-control"))
            .arg("--data-dir")
            .arg(dir)
            .args(["--listen", &addr.to_string(), "--store", store, "--standby"])
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .unwrap();
        Standby { child, addr, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Standby {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `weftctl --server <servers> apply -f -` with `manifest`: exit code and stderr.
fn apply_at(servers: &str, manifest: &str) -> (i32, String) {
    use std::io::Write;
    let mut child = std::process::Command::new(workspace_bin("weftctl"))
        .args(["--server", servers, "apply", "-f", "-"])
        .env_remove("WEFT_TOKEN")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(manifest.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn chain(greeting: &str) -> String {
    format!(
        "kind: Chain
name: s1-ingress
spec:
  listener: ingress
  filters:
    - {{ name: basic, module: basic, config: {{ greeting: {greeting} }} }}
"
    )
}

/// Active and standby control services on one etcd prefix: the active one is killed, the
/// standby takes the prefix over with everything in it, proxies given both addresses fail
/// over to it and weftctl too, and traffic never notices.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_control_service_takes_over_and_proxies_fail_over_to_it() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let etcd = Etcd::start(&d.join("etcd")).await;
    let store = format!("etcd://{}/ha", etcd.client);
    let mut active = control_on(&d.join("active"), &store).await;
    let standby = Standby::start(&d.join("standby"), &store);
    let both = format!("{},http://{}", active.url(), standby.addr);

    let (code, _, err) = active.weftctl(&[
        "module",
        "push",
        guest_filter("compat_basic").to_str().unwrap(),
        "--name",
        "basic",
    ]);
    assert_eq!(code, 0, "{err}");
    let (code, err) = apply_at(&both, &chain("from-active"));
    assert_eq!(code, 0, "{err}");
    let up = Upstream::start("svc").await;
    let boot = format!(
        "admin: {{ address: \"{{admin}}\" }}
listeners:
  - name: ingress
    address: \"{{listen}}\"
    default_cluster: svc
clusters:
  - name: svc
    endpoints: [ {{ address: \"{}\" }} ]
",
        up.address()
    );
    let mut args = active.proxy_args("p", &[], &d.join("p"));
    args[1] = both.clone();
    let proxy = ProxyProcess::start_args(&boot, 1, &args, free_port(), free_port()).await;
    let greeting = |proxy: &ProxyProcess| {
        let url = proxy.url("/x");
        async move {
            match get(&h1_client(), &url).await {
                Ok(g) if g.status == 200 => crate::reload::greeting(&g),
                other => format!("{other:?}"),
            }
        }
    };
    let deadline = Instant::now() + Duration::from_secs(30);
    while greeting(&proxy).await != "from-active" {
        assert!(Instant::now() < deadline, "{}", proxy.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Traffic all along: the proxy serves with or without a control service.
    let traffic = {
        let url = proxy.url("/steady");
        tokio::spawn(async move {
            let client = h1_client();
            let mut failed = Vec::new();
            let until = Instant::now() + Duration::from_secs(25);
            for _ in 0..5_000 {
                if Instant::now() > until {
                    break;
                }
                match get(&client, &url).await {
                    Ok(g) if g.status == 200 => {}
                    other => failed.push(format!("{other:?}")),
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            failed
        })
    };

    // The active service dies without a word; the standby takes over once its lease
    // runs out, with everything it stored.
    active.kill();
    let deadline = Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(standby.addr).await.is_err() {
        assert!(
            Instant::now() < deadline,
            "the standby never took over:\n{}",
            standby.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(standby.log().contains("taking over"), "{}", standby.log());
    // weftctl given both addresses reaches the one alive; the proxy follows it there.
    let (code, err) = apply_at(&both, &chain("from-standby"));
    assert_eq!(code, 0, "{err}");
    let deadline = Instant::now() + Duration::from_secs(30);
    while greeting(&proxy).await != "from-standby" {
        assert!(Instant::now() < deadline, "{}", proxy.log());
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let failed = traffic.await.unwrap();
    assert!(failed.is_empty(), "{failed:?}");
    drop(etcd);
}
