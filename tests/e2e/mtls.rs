//! TLS end to end: two sidecars speaking mesh mTLS (identities checked both ways), strict and
//! permissive inbound listeners probed with curl and every kind of bad client certificate,
//! edge TLS chosen by SNI and reloaded from its files, TLS to an external service, and
//! startup refusing bad files.

use std::path::Path;
use std::time::Duration;

use weft_tests::pki::{Ca, Leaf, LeafFiles, self_signed};
use weft_tests::*;

const A_ID: &str = "spiffe://weft.local/ns/default/sa/a";
const B_ID: &str = "spiffe://weft.local/ns/default/sa/b";

/// The `identity` section for a leaf and a bundle.
fn identity(leaf: &LeafFiles, bundle: &Path) -> String {
    format!(
        "identity: {{ cert_file: \"{}\", key_file: \"{}\", trust_bundle_file: \"{}\" }}\n",
        leaf.cert.display(),
        leaf.key.display(),
        bundle.display()
    )
}

/// A sidecar's inbound side: mesh TLS in `mode` in front of `app`, with the basic filter
/// (which copies what it reads of the connection's TLS into `x-wasm-tls`).
fn inbound(identity: &str, mode: &str, app: &Upstream) -> String {
    format!(
        "admin: {{ address: \"{{admin}}\" }}
wasm: {{ cache_dir: \"{cache}\" }}
{identity}listeners:
  - name: inbound
    address: \"{{listen}}\"
    direction: inbound
    default_cluster: app
    tls: {{ mode: {mode} }}
    filters:
      - {{ name: basic, module: \"{module}\" }}
clusters:
  - name: app
    endpoints: [ {{ address: \"{app}\" }} ]
",
        cache = shared_module_cache().display(),
        module = guest_filter("compat_basic").display(),
        app = app.address(),
    )
}

/// A sidecar's outbound side: plaintext in, `cluster_tls` towards `to`.
fn outbound(identity: &str, to: std::net::SocketAddr, endpoint: &str, cluster: &str) -> String {
    format!(
        "admin: {{ address: \"{{admin}}\" }}
{identity}listeners:
  - name: outbound
    address: \"{{listen}}\"
    default_cluster: peer
clusters:
  - name: peer
    connect_timeout_ms: 2000
    endpoints: [ {{ address: \"{to}\"{endpoint} }} ]
{cluster}
"
    )
}

/// `curl` on `url` with `args`: the status code, "000" when no response came.
async fn curl(url: &str, args: &[&str]) -> String {
    let mut cmd = std::process::Command::new("curl");
    cmd.args([
        "-s",
        "--max-time",
        "5",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code}",
    ])
    .args(args)
    .arg(url);
    let out = tokio::task::spawn_blocking(move || cmd.output())
        .await
        .unwrap()
        .expect("curl runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// curl presenting `leaf` as its client certificate (the server's SPIFFE certificate has no
/// name to check: `-k`; the client certificate is what is probed).
async fn curl_with(proxy: &ProxyProcess, leaf: Option<&LeafFiles>) -> String {
    let url = format!("https://{}/probe", proxy.addr);
    match leaf {
        Some(l) => {
            let (c, k) = (l.cert.display().to_string(), l.key.display().to_string());
            curl(&url, &["-k", "--cert", &c, "--key", &k]).await
        }
        None => curl(&url, &["-k"]).await,
    }
}

fn stat(stats: &str, series: &str) -> f64 {
    metric_value(stats, series).unwrap_or(0.0)
}

/// The value of `series` once it reaches `want` (a counter bumped just after the client
/// saw its connection end), or the last one seen after 2 s.
async fn settled(proxy: &ProxyProcess, series: &str, want: f64) -> (f64, String) {
    let mut last = (0.0, String::new());
    for _ in 0..40 {
        let stats = proxy.stats().await;
        last = (stat(&stats, series), stats);
        if last.0 == want {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    last
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_speak_mtls_and_check_each_others_identity() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("mesh root");
    let bundle = ca.write_bundle(dir.path(), "bundle.pem");
    let a = ca.issue(&Leaf::spiffe(A_ID), dir.path(), "a");
    let b = ca.issue(&Leaf::spiffe(B_ID), dir.path(), "b");
    let app = Upstream::start("app").await;
    let sidecar_b = ProxyProcess::start(&inbound(&identity(&b, &bundle), "strict", &app)).await;

    // Both protocols towards the peer: HTTP/2 is agreed by ALPN.
    for protocol in ["http1", "http2"] {
        let cfg = outbound(
            &identity(&a, &bundle),
            sidecar_b.addr,
            &format!(", identity: \"{B_ID}\""),
            &format!("    protocol: {protocol}\n    tls: {{ mode: mesh }}"),
        );
        let sidecar_a = ProxyProcess::start(&cfg).await;
        let got = get(&h1_client(), &sidecar_a.url("/hello")).await.unwrap();
        assert_eq!(got.status, 200, "{protocol}: {}", sidecar_b.log());
        let echo = got.echo();
        let tls = echo["headers"]["x-wasm-tls"][0]
            .as_str()
            .unwrap_or_default();
        assert_eq!(
            tls,
            format!("principal={A_ID} san={A_ID} version=TLSv1.3 mtls=[1] scheme=https"),
            "{protocol}: what the inbound filter saw of its peer"
        );
    }
    let series = "weft_downstream_tls_connections_total{listener=\"inbound\"}";
    let (connections, stats) = settled(&sidecar_b, series, 2.0).await;
    assert_eq!(connections, 2.0, "{stats}");

    // A server that is not who the cluster expects is refused before any request goes out.
    let cfg = outbound(
        &identity(&a, &bundle),
        sidecar_b.addr,
        ", identity: \"spiffe://weft.local/ns/default/sa/c\"",
        "    tls: { mode: mesh }",
    );
    let wrong = ProxyProcess::start(&cfg).await;
    let hits = app.hits();
    let got = get(&h1_client(), &wrong.url("/x")).await.unwrap();
    assert_eq!(got.status, 503, "{}", got.body);
    assert_eq!(app.hits(), hits, "nothing reached the app");
    let stats = wrong.stats().await;
    assert!(
        stat(&stats, "weft_upstream_tls_failures_total{cluster=\"peer\"}") >= 1.0,
        "{stats}"
    );

    // The cluster's list of identities works the same way; a peer in it is accepted.
    let cfg = outbound(
        &identity(&a, &bundle),
        sidecar_b.addr,
        "",
        &format!("    tls: {{ mode: mesh, identities: [\"{B_ID}\"] }}"),
    );
    let listed = ProxyProcess::start(&cfg).await;
    assert_eq!(
        get(&h1_client(), &listed.url("/y")).await.unwrap().status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_strict_listener_refuses_plaintext_and_every_bad_client_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new("mesh root");
    let bundle = ca.write_bundle(d, "bundle.pem");
    let b = ca.issue(&Leaf::spiffe(B_ID), d, "b");
    let app = Upstream::start("app").await;
    let sidecar = ProxyProcess::start(&inbound(&identity(&b, &bundle), "strict", &app)).await;

    let good = ca.issue(&Leaf::spiffe(A_ID), d, "good");
    assert_eq!(curl_with(&sidecar, Some(&good)).await, "200");

    let other_ca = Ca::new("another root");
    let bad: Vec<(&str, LeafFiles)> = vec![
        ("expired", ca.issue(&Leaf::expired(A_ID), d, "expired")),
        (
            "not yet valid",
            ca.issue(
                &Leaf {
                    valid: ((2090, 1, 1), (2099, 1, 1)),
                    ..Leaf::spiffe(A_ID)
                },
                d,
                "future",
            ),
        ),
        (
            "another trust domain",
            ca.issue(
                &Leaf::spiffe("spiffe://evil.local/ns/default/sa/a"),
                d,
                "td",
            ),
        ),
        (
            "two URI SANs",
            ca.issue(
                &Leaf {
                    uris: vec![A_ID, "spiffe://weft.local/ns/default/sa/admin"],
                    ..Leaf::spiffe(A_ID)
                },
                d,
                "two",
            ),
        ),
        (
            "no SPIFFE ID",
            ca.issue(&Leaf::dns(&["a.example"]), d, "dns"),
        ),
        ("self-signed", self_signed(&Leaf::spiffe(A_ID), d, "self")),
        (
            "another CA",
            other_ca.issue(&Leaf::spiffe(A_ID), d, "other"),
        ),
    ];
    for (what, leaf) in &bad {
        assert_eq!(
            curl_with(&sidecar, Some(leaf)).await,
            "000",
            "{what} was let in"
        );
    }
    assert_eq!(
        curl_with(&sidecar, None).await,
        "000",
        "no client certificate"
    );

    // A plaintext client gets nothing (its request is not TLS).
    let raw = raw_request(sidecar.addr, b"GET / HTTP/1.1\r\nhost: a\r\n\r\n")
        .await
        .unwrap_or_default();
    assert!(!raw.starts_with("HTTP/1.1"), "plaintext was served: {raw}");

    let want = bad.len() as f64 + 2.0;
    let series = "weft_downstream_tls_handshake_failures_total{listener=\"inbound\"}";
    let (failures, stats) = settled(&sidecar, series, want).await;
    assert_eq!(failures, want, "{stats}");
    assert_eq!(app.hits(), 1, "only the good client reached the app");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_permissive_listener_serves_mtls_and_plaintext_on_one_port() {
    let dir = tempfile::tempdir().unwrap();
    let ca = Ca::new("mesh root");
    let bundle = ca.write_bundle(dir.path(), "bundle.pem");
    let b = ca.issue(&Leaf::spiffe(B_ID), dir.path(), "b");
    let a = ca.issue(&Leaf::spiffe(A_ID), dir.path(), "a");
    let app = Upstream::start("app").await;
    let sidecar = ProxyProcess::start(&inbound(&identity(&b, &bundle), "permissive", &app)).await;

    let plain = get(&h1_client(), &sidecar.url("/plain")).await.unwrap();
    assert_eq!(plain.status, 200);
    assert_eq!(
        plain.echo()["headers"]["x-wasm-tls"][0],
        "principal=<none> san=<none> version=<none> mtls=[0] scheme=http"
    );
    assert_eq!(curl_with(&sidecar, Some(&a)).await, "200");
    // TLS still means mesh mTLS: a TLS client without a certificate is refused.
    assert_eq!(curl_with(&sidecar, None).await, "000");
    assert_eq!(app.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn edge_tls_picks_certificates_by_sni_reloads_them_and_clusters_originate_tls() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new("edge root");
    let ca_file = ca.write_bundle(d, "edge-ca.pem");
    let one = ca.issue(&Leaf::dns(&["one.example"]), d, "one");
    let two = ca.issue(&Leaf::dns(&["*.two.example"]), d, "two");
    let app = Upstream::start("app").await;
    let cfg = format!(
        "admin: {{ address: \"{{admin}}\" }}
listeners:
  - name: edge
    address: \"{{listen}}\"
    default_cluster: app
    tls:
      mode: simple
      certificates:
        - {{ cert_file: \"{}\", key_file: \"{}\" }}
        - {{ cert_file: \"{}\", key_file: \"{}\" }}
clusters:
  - name: app
    endpoints: [ {{ address: \"{}\" }} ]
",
        one.cert.display(),
        one.key.display(),
        two.cert.display(),
        two.key.display(),
        app.address()
    );
    let edge = ProxyProcess::start(&cfg).await;
    let port = edge.addr.port();
    let ca_arg = ca_file.display().to_string();
    // curl checks the name: each SNI got its own certificate.
    for host in ["one.example", "api.two.example"] {
        let resolve = format!("{host}:{port}:127.0.0.1");
        let url = format!("https://{host}:{port}/");
        assert_eq!(
            curl(&url, &["--cacert", &ca_arg, "--resolve", &resolve]).await,
            "200",
            "{host}"
        );
    }

    // A cluster that originates TLS to it, checking the name against a CA file.
    let origin = |server_name: &str, ca: &Path| {
        format!(
            "admin: {{ address: \"{{admin}}\" }}
listeners:
  - name: out
    address: \"{{listen}}\"
    default_cluster: ext
clusters:
  - name: ext
    endpoints: [ {{ address: \"{}\" }} ]
    tls: {{ mode: simple, server_name: \"{server_name}\", ca_file: \"{}\" }}
",
            edge.addr,
            ca.display()
        )
    };
    let out = ProxyProcess::start(&origin("one.example", &ca_file)).await;
    assert_eq!(
        get(&h1_client(), &out.url("/ext")).await.unwrap().status,
        200
    );
    // Another CA's roots: the server is not trusted, nothing is sent.
    let stranger = Ca::new("stranger");
    let stranger_file = stranger.write_bundle(d, "stranger.pem");
    let refused = ProxyProcess::start(&origin("one.example", &stranger_file)).await;
    let hits = app.hits();
    assert_eq!(
        get(&h1_client(), &refused.url("/ext"))
            .await
            .unwrap()
            .status,
        503
    );
    assert_eq!(app.hits(), hits);

    // The certificate files are replaced: new handshakes use the new certificate.
    let ca2 = Ca::new("edge root 2");
    let ca2_file = ca2.write_bundle(d, "edge-ca2.pem");
    let renewed = ca2.issue(&Leaf::dns(&["one.example"]), d, "renewed");
    std::fs::copy(&renewed.key, &one.key).unwrap();
    std::fs::copy(&renewed.cert, &one.cert).unwrap();
    let resolve = format!("one.example:{port}:127.0.0.1");
    let url = format!("https://one.example:{port}/");
    let ca2_arg = ca2_file.display().to_string();
    let mut code = String::new();
    for _ in 0..40 {
        code = curl(&url, &["--cacert", &ca2_arg, "--resolve", &resolve]).await;
        if code == "200" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        code,
        "200",
        "the renewed certificate was never served: {}",
        edge.log()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_tls_files_stop_the_proxy_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new("mesh root");
    let bundle = ca.write_bundle(d, "bundle.pem");
    let a = ca.issue(&Leaf::spiffe(A_ID), d, "a");
    let b = ca.issue(&Leaf::spiffe(B_ID), d, "b");
    let expired = ca.issue(&Leaf::expired(A_ID), d, "expired");
    let base = |identity: &str, tls: &str| {
        format!(
            "{identity}listeners:
  - name: in
    address: 127.0.0.1:0
    default_cluster: app
    tls: {tls}
clusters:
  - name: app
    endpoints: [ {{ address: \"127.0.0.1:9\" }} ]
"
        )
    };
    let mismatched = LeafFiles {
        cert: a.cert.clone(),
        key: b.key.clone(),
    };
    let missing = LeafFiles {
        cert: d.join("nope.crt"),
        key: a.key.clone(),
    };
    let cases = [
        (
            base(&identity(&mismatched, &bundle), "{ mode: strict }"),
            b.key.display().to_string(),
        ),
        (
            base(&identity(&missing, &bundle), "{ mode: strict }"),
            d.join("nope.crt").display().to_string(),
        ),
        (
            base(&identity(&expired, &bundle), "{ mode: strict }"),
            expired.cert.display().to_string(),
        ),
        (
            base(&identity(&a, &a.cert), "{ mode: strict }"),
            a.cert.display().to_string(),
        ),
        (base("", "{ mode: strict }"), "identity".to_owned()),
        (
            base(
                "",
                &format!(
                    "{{ mode: simple, certificates: [ {{ cert_file: \"{}\", key_file: \"{}\" }} ] }}",
                    a.cert.display(),
                    b.key.display()
                ),
            ),
            b.key.display().to_string(),
        ),
    ];
    for (yaml, names) in cases {
        let (status, err) = run_proxy_expecting_failure(&yaml, "weft.yaml");
        assert_eq!(status.code(), Some(2), "{yaml}\n{err}");
        assert!(err.contains(&names), "the error names {names}: {err}");
    }
}

/// The proxy's identity as `/certs` reports it.
async fn certs(proxy: &ProxyProcess) -> serde_json::Value {
    let (status, body) = proxy.admin_get("/certs").await.unwrap();
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn identity_files_rotate_under_traffic_without_a_failed_request() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new("mesh root");
    let bundle = ca.write_bundle(d, "bundle.pem");
    let a = ca.issue(&Leaf::spiffe(A_ID), d, "a");
    let b = ca.issue(&Leaf::spiffe(B_ID), d, "b");
    let app = Upstream::start("app").await;
    // Twenty requests a connection: new handshakes all along, before and after the
    // rotation.
    let cfg = inbound(&identity(&b, &bundle), "strict", &app).replace(
        "direction: inbound",
        "direction: inbound\n    max_requests_per_connection: 20",
    );
    let sidecar_b = ProxyProcess::start(&cfg).await;
    let cfg = outbound(
        &identity(&a, &bundle),
        sidecar_b.addr,
        &format!(", identity: \"{B_ID}\""),
        "    tls: { mode: mesh }",
    );
    let sidecar_a = ProxyProcess::start(&cfg).await;
    let before = certs(&sidecar_b).await["identity"].clone();
    assert_eq!(before["spiffe_id"], B_ID);
    assert_eq!(before["expired"], false);

    // Traffic all along: a request every 10 ms.
    let url = sidecar_a.url("/steady");
    let traffic = tokio::spawn(async move {
        let client = h1_client();
        let (mut ok, mut failed) = (0, Vec::new());
        for i in 0..300 {
            match get(&client, &url).await {
                Ok(g) if g.status == 200 => ok += 1,
                other => failed.push((i, format!("{other:?}"))),
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        (ok, failed)
    });
    tokio::time::sleep(Duration::from_millis(800)).await;

    // A bad rotation (an expired certificate) is refused: the identity held stays.
    let expired = ca.issue(&Leaf::expired(B_ID), d, "b-expired");
    std::fs::copy(&expired.key, &b.key).unwrap();
    std::fs::copy(&expired.cert, &b.cert).unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(
        certs(&sidecar_b).await["identity"]["serial"],
        before["serial"]
    );

    // A good one is taken, without a restart.
    let renewed = ca.issue(&Leaf::spiffe(B_ID), d, "b-renewed");
    std::fs::copy(&renewed.key, &b.key).unwrap();
    std::fs::copy(&renewed.cert, &b.cert).unwrap();
    let mut after = serde_json::Value::Null;
    for _ in 0..40 {
        after = certs(&sidecar_b).await["identity"].clone();
        if after["serial"] != before["serial"] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_ne!(after["serial"], before["serial"], "{}", sidecar_b.log());
    assert_eq!(after["spiffe_id"], B_ID);

    let (ok, failed) = traffic.await.unwrap();
    assert!(failed.is_empty(), "{} failed: {failed:?}", failed.len());
    assert_eq!(ok, 300);
    // Connections were made again and again: those after the rotation got the new
    // certificate (A checks it chains and names B on every handshake).
    let stats = sidecar_b.stats().await;
    assert!(
        stat(
            &stats,
            "weft_downstream_tls_connections_total{listener=\"inbound\"}"
        ) >= 15.0,
        "{stats}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_authz_filter_allows_one_identity_and_denies_another() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let ca = Ca::new("mesh root");
    let bundle = ca.write_bundle(d, "bundle.pem");
    let a = ca.issue(&Leaf::spiffe(A_ID), d, "a");
    let b = ca.issue(&Leaf::spiffe(B_ID), d, "b");
    let c_id = "spiffe://weft.local/ns/default/sa/c";
    let c = ca.issue(&Leaf::spiffe(c_id), d, "c");
    let app = Upstream::start("app").await;
    // B's inbound: only A may call, and not /admin.
    let rules = format!(
        "{{ rules: [ {{ name: a-only, action: allow, from: {{ principals: [\"{A_ID}\"] }} }}, \
         {{ name: no-admin, action: deny, to: {{ paths: [\"/admin\", \"/admin/*\"] }} }} ] }}"
    );
    let cfg = format!(
        "admin: {{ address: \"{{admin}}\" }}
wasm: {{ cache_dir: \"{cache}\" }}
{identity}listeners:
  - name: inbound
    address: \"{{listen}}\"
    direction: inbound
    default_cluster: app
    tls: {{ mode: strict }}
    filters:
      - {{ name: authz, module: \"{module}\", config: {rules} }}
clusters:
  - name: app
    endpoints: [ {{ address: \"{app}\" }} ]
",
        cache = shared_module_cache().display(),
        identity = identity(&b, &bundle),
        module = standard_filter("weft_filter_authz").display(),
        app = app.address(),
    );
    let sidecar_b = ProxyProcess::start(&cfg).await;
    let towards_b = |leaf: &LeafFiles| {
        outbound(
            &identity(leaf, &bundle),
            sidecar_b.addr,
            &format!(", identity: \"{B_ID}\""),
            "    tls: { mode: mesh }",
        )
    };
    let sidecar_a = ProxyProcess::start(&towards_b(&a)).await;
    let sidecar_c = ProxyProcess::start(&towards_b(&c)).await;

    let got = get(&h1_client(), &sidecar_a.url("/items")).await.unwrap();
    assert_eq!(got.status, 200, "{}", got.body);
    let got = get(&h1_client(), &sidecar_a.url("/admin/users"))
        .await
        .unwrap();
    assert_eq!(
        (got.status, got.header("x-weft-authz")),
        (403, "denied by no-admin")
    );
    let got = get(&h1_client(), &sidecar_c.url("/items")).await.unwrap();
    assert_eq!(
        (got.status, got.header("x-weft-authz"), got.body.as_str()),
        (403, "no allow rule matched", "RBAC: access denied\n")
    );
    assert_eq!(app.hits(), 1, "denied requests never reach the app");
    let stats = sidecar_b.stats().await;
    for (series, want) in [
        (
            "weft_filter_authz_decisions_total{decision=\"allow\",rule=\"a-only\"}",
            1.0,
        ),
        (
            "weft_filter_authz_decisions_total{decision=\"deny\",rule=\"no-admin\"}",
            1.0,
        ),
        (
            "weft_filter_authz_decisions_total{decision=\"deny\",rule=\"\"}",
            1.0,
        ),
    ] {
        assert_eq!(stat(&stats, series), want, "{series}\n{stats}");
    }
}
