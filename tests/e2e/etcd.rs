//! The control service's state in a real etcd (`weft-control --store etcd://...`): what one
//! control service stored is there for another started on another data dir after it died;
//! modules larger than etcd's request limit go in chunks; two replicas on a three-member
//! etcd cluster serve at once and survive losing an etcd leader, a replica mid-apply, and
//! a restart of everything, with traffic never failing.

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

/// Starts a control service on `store`.
async fn control_on(dir: &Path, store: &str) -> ControlProcess {
    match ControlProcess::try_start(dir, &["--store", store]).await {
        Ok(c) => c,
        Err(log) => panic!("weft-control on {store}:\n{log}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_service_on_etcd_finds_everything_another_one_stored() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let etcd = Etcd::start(&d.join("etcd")).await;
    let store = format!("etcd://{}/weft-test", etcd.client);

    let mut first = control_on(&d.join("first"), &store).await;

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

    // The first service dies without a word; another, on an empty data dir of its own,
    // serves what it stored.
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
    let proxy =
        ProxyProcess::start_args_any(&boot, 1, &second.proxy_args("p", &["app=s1"], &d.join("p")))
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

/// `weftctl --server <servers> <args>`: exit code, stdout, stderr.
fn weftctl_at(servers: &str, args: &[&str]) -> (i32, String, String) {
    let out = std::process::Command::new(workspace_bin("weftctl"))
        .args(["--server", servers])
        .args(args)
        .env_remove("WEFT_TOKEN")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The chain `s1-ingress` greeting with `greeting`, and a FilterConfig `marker` saying the
/// same: an apply of two resources, all or nothing.
fn chain_and_marker(greeting: &str) -> String {
    format!(
        "{}---
kind: FilterConfig
name: marker
spec:
  config: {{ greeting: {greeting} }}
",
        chain(greeting)
    )
}

/// `apply` through `servers`, tried again while it fails (etcd electing a leader, a
/// replica down), for up to 30 s: how many tries it took.
fn apply_until_done(servers: &str, manifest: &str) -> usize {
    let deadline = Instant::now() + Duration::from_secs(30);
    for tries in 1.. {
        let (code, err) = apply_at(servers, manifest);
        if code == 0 {
            return tries;
        }
        assert!(Instant::now() < deadline, "apply never succeeded: {err}");
        std::thread::sleep(Duration::from_millis(200));
    }
    unreachable!()
}

/// The first `greeting` value in `text` ("" when none).
fn greeting_in(text: &str) -> String {
    text.split("greeting")
        .nth(1)
        .map(|rest| {
            rest.trim_start_matches(|c: char| !c.is_alphanumeric())
                .split(|c: char| !(c.is_alphanumeric() || c == '-'))
                .next()
                .unwrap_or_default()
                .to_owned()
        })
        .unwrap_or_default()
}

/// What replica `servers` stores: the greetings of chain `s1-ingress` and FilterConfig
/// `marker` ("" when absent) and the config version.
fn stored_at(servers: &str) -> (String, String, u64) {
    let listed = |what: &str| {
        let (code, out, err) = weftctl_at(servers, &["get", what, "-o", "json"]);
        assert_eq!(code, 0, "{err}");
        out
    };
    let chain = greeting_in(&listed("chains"));
    let marker = greeting_in(&listed("filterconfigs"));
    let (code, out, err) = weftctl_at(servers, &["status", "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    let status: serde_json::Value = serde_json::from_str(&out).unwrap();
    (chain, marker, status["version"].as_u64().unwrap_or(0))
}

/// Waits (up to 30 s) until `proxy` answers with `greeting`.
async fn until_greeting(proxy: &ProxyProcess, greeting: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let got = match get(&h1_client(), &proxy.url("/x")).await {
            Ok(g) if g.status == 200 => crate::reload::greeting(&g),
            other => format!("{other:?}"),
        };
        if got == greeting {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "still `{got}`, not `{greeting}`:\n{}",
            proxy.log()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Whether replica `servers` lists an instance at `address`.
fn lists_instance(servers: &str, address: &str) -> bool {
    let (code, out, err) = weftctl_at(servers, &["get", "services", "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    out.contains(address)
}

/// Two control replicas on one prefix of a three-member etcd cluster, both serving at once:
/// a module pushed through one is used by a chain applied through the other; the etcd
/// leader is killed, then a replica in the middle of an apply, then everything is
/// restarted. Proxies (one on each replica) keep serving throughout with zero failed
/// requests, converge on the newest config each time, and nothing acknowledged is lost; an
/// instance's heartbeats move to the surviving replica and keep its etcd lease alive.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_three_etcd_members_lose_the_etcd_leader_a_replica_and_everything() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path().to_path_buf();
    std::mem::forget(dir);
    eprintln!("DIR {}", d.display());
    let d = d.as_path();
    let mut etcd = EtcdCluster::start(&d.join("etcd"), 3).await;
    let store = format!("etcd://{}/mesh", etcd.endpoints());
    let args = ["--store", store.as_str()];
    let (port_a, port_b) = (free_port(), free_port());
    let mut a = ControlProcess::start_full(&d.join("a"), port_a, None, &args).await;
    let mut b = ControlProcess::start_full(&d.join("b"), port_b, None, &args).await;
    let ab = format!("{},{}", a.url(), b.url());
    let ba = format!("{},{}", b.url(), a.url());

    // Both serve at once: a module pushed through A, a chain applied through B.
    let (code, _, err) = a.weftctl(&[
        "module",
        "push",
        guest_filter("compat_basic").to_str().unwrap(),
        "--name",
        "basic",
    ]);
    assert_eq!(code, 0, "{err}");
    let (code, err) = apply_at(&b.url(), &chain_and_marker("v1"));
    assert_eq!(code, 0, "{err}");

    // One proxy follows A first, the other B first; each is given both.
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
    let mut args1 = a.proxy_args("p1", &[], &d.join("p1"));
    args1[1] = ab.clone();
    let mut args2 = b.proxy_args("p2", &[], &d.join("p2"));
    args2[1] = ba.clone();
    let p1 = ProxyProcess::start_args_any(&boot, 1, &args1).await;
    let p2 = ProxyProcess::start_args_any(&boot, 1, &args2).await;
    until_greeting(&p1, "v1").await;
    until_greeting(&p2, "v1").await;

    // Traffic through both, all along: paced, bounded in count and time.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let traffic: Vec<_> = [p1.url("/steady"), p2.url("/steady")]
        .into_iter()
        .map(|url| {
            let stop = stop.clone();
            tokio::spawn(async move {
                let client = h1_client();
                let (mut sent, mut failed) = (0u32, Vec::new());
                let until = Instant::now() + Duration::from_secs(240);
                while !stop.load(std::sync::atomic::Ordering::Relaxed)
                    && Instant::now() < until
                    && sent < 40_000
                {
                    sent += 1;
                    match get(&client, &url).await {
                        Ok(g) if g.status == 200 => {}
                        other => failed.push(format!("{other:?}")),
                    }
                    tokio::time::sleep(Duration::from_millis(10)).await;
                }
                (sent, failed)
            })
        })
        .collect();

    // An instance registered through A with a 3 s TTL, heartbeating to A, else B.
    let instance = "127.0.0.1:9";
    let mut keeper = std::process::Command::new(workspace_bin("weftctl"))
        .args(["--server", &ab, "register", "api", instance])
        .args(["--ttl", "3", "--keep-alive"])
        .env_remove("WEFT_TOKEN")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(d.join("keeper.log")).unwrap())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    while !lists_instance(&b.url(), instance) {
        assert!(Instant::now() < deadline, "B never saw the instance");
        std::thread::sleep(Duration::from_millis(100));
    }

    // 1. The etcd leader dies: an apply goes through once etcd has elected another, and
    // both proxies converge.
    let leader = etcd.leader().await;
    etcd.members[leader].kill();
    let tries = apply_until_done(&ab, &chain_and_marker("v2"));
    eprintln!("apply after the etcd leader died: {tries} tries");
    until_greeting(&p1, "v2").await;
    until_greeting(&p2, "v2").await;
    let (chain_a, marker_a, version_a) = stored_at(&a.url());
    assert_eq!((chain_a.as_str(), marker_a.as_str()), ("v2", "v2"));
    let deadline = Instant::now() + Duration::from_secs(10);
    while stored_at(&b.url()).2 != version_a {
        assert!(Instant::now() < deadline, "B never caught up with A");
        std::thread::sleep(Duration::from_millis(100));
    }

    // 2. Replica A dies in the middle of an apply of two resources, at a different moment
    // each time: the apply happened whole or not at all, and it happened if weftctl said
    // so.
    let mut outcomes = Vec::new();
    for (round, delay_ms) in [2u64, 6, 9, 11, 13, 16, 25, 60].into_iter().enumerate() {
        if round > 0 {
            a = ControlProcess::start_full(&d.join("a"), port_a, None, &args).await;
        }
        let greeting = format!("v3-{round}");
        let mut apply = std::process::Command::new(workspace_bin("weftctl"))
            .args(["--server", &a.url(), "apply", "-f", "-"])
            .env_remove("WEFT_TOKEN")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        {
            use std::io::Write;
            apply
                .stdin
                .take()
                .unwrap()
                .write_all(chain_and_marker(&greeting).as_bytes())
                .unwrap();
        }
        std::thread::sleep(Duration::from_millis(delay_ms));
        a.kill();
        let answered = apply.wait_with_output().unwrap();
        let (chain_b, marker_b, _) = stored_at(&b.url());
        assert_eq!(chain_b, marker_b, "an apply half done");
        if answered.status.success() {
            assert_eq!(chain_b, greeting, "an acknowledged apply lost");
        }
        outcomes.push(match (answered.status.success(), chain_b == greeting) {
            (true, _) => "acknowledged",
            (false, true) => "failed, done",
            (false, false) => "failed, not done",
        });
    }
    eprintln!("applies while A was killed: {outcomes:?}");
    // The proxy on A fails over to B and follows what is applied there.
    let tries = apply_until_done(&ba, &chain_and_marker("v4"));
    assert_eq!(tries, 1, "B serves alone");
    until_greeting(&p1, "v4").await;
    until_greeting(&p2, "v4").await;
    // The instance's heartbeats moved to B: its lease outlives its TTL twice over.
    std::thread::sleep(Duration::from_secs(6));
    assert!(
        lists_instance(&b.url(), instance),
        "{}",
        std::fs::read_to_string(d.join("keeper.log")).unwrap_or_default()
    );

    // 3. The etcd member and replica A come back.
    etcd.members[leader].restart().await;
    a = ControlProcess::start_full(&d.join("a"), port_a, None, &args).await;
    let (chain_a, _, version_a) = stored_at(&a.url());
    assert_eq!(chain_a, "v4");

    // 4. Everything restarts: both replicas and every etcd member. Proxies serve on.
    a.kill();
    b.kill();
    etcd.restart_all().await;
    a = ControlProcess::start_full(&d.join("a"), port_a, None, &args).await;
    b = ControlProcess::start_full(&d.join("b"), port_b, None, &args).await;
    for replica in [&a, &b] {
        assert_eq!(
            stored_at(&replica.url()),
            ("v4".to_owned(), "v4".to_owned(), version_a),
            "nothing applied may be lost"
        );
    }
    let (code, err) = apply_at(&a.url(), &chain_and_marker("v5"));
    assert_eq!(code, 0, "{err}");
    until_greeting(&p1, "v5").await;
    until_greeting(&p2, "v5").await;

    // The instance stops heartbeating (killed, no goodbye): etcd expires its lease and
    // both replicas drop it.
    let _ = keeper.kill();
    let _ = keeper.wait();
    let deadline = Instant::now() + Duration::from_secs(15);
    while lists_instance(&a.url(), instance) || lists_instance(&b.url(), instance) {
        assert!(Instant::now() < deadline, "the instance never expired");
        std::thread::sleep(Duration::from_millis(200));
    }

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    for t in traffic {
        let (sent, failed) = t.await.unwrap();
        assert!(sent > 100, "{sent} requests");
        assert!(
            failed.is_empty(),
            "{} of {sent} failed: {:?}",
            failed.len(),
            &failed[..failed.len().min(5)]
        );
    }
}
