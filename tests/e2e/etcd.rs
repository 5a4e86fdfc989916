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
