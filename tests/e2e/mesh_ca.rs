//! The control service as the mesh CA: proxies enrolled with join tokens speak mTLS, renew
//! certificates of a few seconds under traffic without a failed request, keep serving
//! while the CA is away until their certificate expires, and tokens and CSRs that do not
//! match are refused.

use std::path::Path;
use std::time::{Duration, Instant};

use rcgen::{CertificateParams, KeyPair, SanType};
use weft_proto::v1;
use weft_tests::*;

const A_ID: &str = "spiffe://weft.local/ns/default/sa/a";
const B_ID: &str = "spiffe://weft.local/ns/default/sa/b";

/// Mints a join token for service account `sa` and writes it to `dir/<sa>.token`.
fn token_file(control: &ControlProcess, sa: &str, dir: &Path) -> std::path::PathBuf {
    let (code, token, err) = control.weftctl(&["identity", "token", "--service-account", sa]);
    assert_eq!(code, 0, "{err}");
    assert!(
        err.contains(&format!("spiffe://weft.local/ns/default/sa/{sa}")),
        "{err}"
    );
    let path = dir.join(format!("{sa}.token"));
    std::fs::write(&path, token.trim()).unwrap();
    path
}

/// The inbound sidecar of `app`: strict mTLS, identity from the CA; twenty requests a
/// connection, so that handshakes happen all along.
fn inbound(token: &Path, app: &Upstream) -> String {
    format!(
        "admin: {{ address: \"{{admin}}\" }}
identity: {{ token_file: \"{}\" }}
listeners:
  - name: inbound
    address: \"{{listen}}\"
    default_cluster: app
    max_requests_per_connection: 20
    tls: {{ mode: strict }}
clusters:
  - name: app
    endpoints: [ {{ address: \"{}\" }} ]
",
        token.display(),
        app.address()
    )
}

/// The outbound sidecar calling `to` over mesh mTLS, expecting it to be B. The connect
/// timeout (TCP and handshake) is 5 s: a test machine running other tests beside these can
/// stall a handshake past the default second, while a refused certificate fails at once.
fn outbound(token: &Path, to: std::net::SocketAddr) -> String {
    format!(
        "admin: {{ address: \"{{admin}}\" }}
identity: {{ token_file: \"{}\" }}
listeners:
  - name: outbound
    address: \"{{listen}}\"
    default_cluster: b
clusters:
  - name: b
    endpoints: [ {{ address: \"{to}\", identity: \"{B_ID}\" }} ]
    tls: {{ mode: mesh }}
    connect_timeout_ms: 5000
",
        token.display()
    )
}

/// Two sidecars enrolled with `control`: B (inbound, in front of `app`) and A (outbound,
/// calling B over mesh mTLS), with their token files and B's arguments (to restart it).
struct Pair {
    a: ProxyProcess,
    b: ProxyProcess,
    a_token: std::path::PathBuf,
    b_token: std::path::PathBuf,
    b_args: Vec<String>,
}

async fn enrolled_pair(control: &ControlProcess, app: &Upstream, d: &Path) -> Pair {
    let b_token = token_file(control, "b", d);
    let b_args = control.proxy_args("b", &[], &d.join("b"));
    let b = start(&inbound(&b_token, app), b_args.clone()).await;
    let a_token = token_file(control, "a", d);
    let a_args = control.proxy_args("a", &[], &d.join("a"));
    let a = start(&outbound(&a_token, b.addr), a_args).await;
    Pair {
        a,
        b,
        a_token,
        b_token,
        b_args,
    }
}

async fn serial(proxy: &ProxyProcess) -> String {
    let (_, body) = proxy.admin_get("/certs").await.unwrap();
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["identity"]["serial"]
        .as_str()
        .unwrap_or_default()
        .to_owned()
}

async fn start(yaml: &str, args: Vec<String>) -> ProxyProcess {
    ProxyProcess::start_args_any(yaml, 1, &args).await
}

/// The answered and failed requests of the client tasks, added up.
async fn sum(tasks: Vec<tokio::task::JoinHandle<(usize, Vec<String>)>>) -> (usize, Vec<String>) {
    let mut total = (0, Vec::new());
    for t in tasks {
        let (ok, failed) = t.await.unwrap();
        total.0 += ok;
        total.1.extend(failed);
    }
    total
}

/// Requests through `proxy` from `clients` loops for `run`: (answered 200, failures).
async fn traffic(proxy: &ProxyProcess, clients: usize, run: Duration) -> (usize, Vec<String>) {
    let mut tasks = Vec::new();
    for _ in 0..clients {
        let url = proxy.url("/steady");
        tasks.push(tokio::spawn(async move {
            let client = h1_client();
            let until = Instant::now() + run;
            let (mut ok, mut failed) = (0, Vec::new());
            // Bounded: `run` and 100,000 requests per client, whichever comes first.
            for _ in 0..100_000 {
                if Instant::now() >= until {
                    break;
                }
                match get(&client, &url).await {
                    Ok(g) if g.status == 200 => ok += 1,
                    other => failed.push(format!("{other:?}")),
                }
            }
            (ok, failed)
        }));
    }
    sum(tasks).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxies_enrolled_with_the_mesh_ca_renew_under_traffic_without_a_failure() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let control =
        ControlProcess::start_with(&d.join("control"), &["--cert-ttl-seconds", "4"]).await;
    let app = Upstream::start("app").await;
    let Pair {
        a,
        b,
        a_token,
        b_token,
        b_args,
    } = enrolled_pair(&control, &app, d).await;

    // Serials seen on both sides while traffic flows for 12 s (certificates of 4 s renew
    // about every 3 s).
    let watch = async {
        let mut seen = (Vec::new(), Vec::new());
        for _ in 0..48 {
            for (proxy, serials) in [(&a, &mut seen.0), (&b, &mut seen.1)] {
                let s = serial(proxy).await;
                if !s.is_empty() && serials.last() != Some(&s) {
                    serials.push(s);
                }
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        seen
    };
    let ((ok, failed), (a_serials, b_serials)) =
        tokio::join!(traffic(&a, 4, Duration::from_secs(12)), watch);
    assert!(
        failed.is_empty(),
        "{} of {} failed: {:?}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 500, "only {ok} requests in 12 s");
    assert!(
        a_serials.len() >= 3,
        "A's certificate renewed: {a_serials:?}\n{}",
        a.log()
    );
    assert!(
        b_serials.len() >= 3,
        "B's certificate renewed: {b_serials:?}\n{}",
        b.log()
    );
    let stats = b.stats().await;
    assert!(
        metric_value(
            &stats,
            "weft_downstream_tls_connections_total{listener=\"inbound\"}"
        )
        .unwrap_or(0.0)
            >= 10.0,
        "{stats}"
    );

    // A used token does not give a second proxy the identity; an unknown one neither.
    for (token, why) in [
        (&a_token, "already used"),
        (&d.join("bogus.token"), "unknown join token"),
    ] {
        if !token.exists() {
            std::fs::write(token, "00ff").unwrap();
        }
        let err = ProxyProcess::try_start_args(
            &outbound(token, b.addr),
            1,
            &control.proxy_args("thief", &[], &d.join("thief-state")),
            free_port(),
            free_port(),
        )
        .await
        .err()
        .expect("a proxy started with a bad token");
        assert!(err.contains(why), "{why}: {err}");
        assert!(err.contains("exit status: 2"), "{err}");
    }

    // A restarted proxy keeps its identity (from its state dir): no new token needed.
    let (admin, listen) = (b.admin.port(), b.addr.port());
    drop(b);
    let b = ProxyProcess::start_args(&inbound(&b_token, &app), 1, &b_args, admin, listen).await;
    assert_eq!(
        get(&h1_client(), &a.url("/again")).await.unwrap().status,
        200,
        "{}",
        b.log()
    );

    // The trust bundle, as PEM, names the mesh root.
    let (code, bundle, err) = control.weftctl(&["ca", "bundle"]);
    assert_eq!(code, 0, "{err}");
    let bundle_file = d.join("bundle.pem");
    std::fs::write(&bundle_file, &bundle).unwrap();
    let out = std::process::Command::new("openssl")
        .args(["x509", "-noout", "-subject", "-in"])
        .arg(&bundle_file)
        .output()
        .unwrap();
    let subject = String::from_utf8_lossy(&out.stdout);
    assert!(subject.contains("weft mesh root weft.local"), "{subject}");
}

/// `rate` requests a second through `proxy` for `run`, from 25 clients each on its own
/// clock (a late request is sent at once, to keep the rate): (answered 200, failures).
async fn paced(proxy: &ProxyProcess, rate: u32, run: Duration) -> (usize, Vec<String>) {
    const CLIENTS: u32 = 25;
    let each = rate / CLIENTS;
    let count = (run.as_secs_f64() * f64::from(each)) as usize;
    let mut tasks = Vec::new();
    for _ in 0..CLIENTS {
        let url = proxy.url("/paced");
        tasks.push(tokio::spawn(async move {
            let client = h1_client();
            let mut clock = tokio::time::interval(Duration::from_secs(1) / each);
            let give_up = Instant::now() + run + Duration::from_secs(20);
            let (mut ok, mut failed) = (0, Vec::new());
            // Bounded by count, and by time should the proxies fall far behind.
            for _ in 0..count {
                clock.tick().await;
                if Instant::now() > give_up {
                    failed.push("not sent: the run fell 20 s behind".to_owned());
                    break;
                }
                match get(&client, &url).await {
                    Ok(g) if g.status == 200 => ok += 1,
                    other => failed.push(format!("{other:?}")),
                }
            }
            (ok, failed)
        }));
    }
    sum(tasks).await
}

async fn certs(proxy: &ProxyProcess) -> serde_json::Value {
    let (_, body) = proxy.admin_get("/certs").await.unwrap();
    serde_json::from_str::<serde_json::Value>(&body).unwrap()["identity"].clone()
}

fn ca_status(control: &ControlProcess) -> serde_json::Value {
    let (code, out, err) = control.weftctl(&["ca", "status", "-o", "json"]);
    assert_eq!(code, 0, "{err}");
    serde_json::from_str(&out).unwrap()
}

/// The run: certificates of 4 s, 1,000 requests a second for a minute from A to B
/// over mesh mTLS (B closes connections every 20 requests, so handshakes go on all along),
/// and a CA rotation in the middle. The proxies trust only the first root for the control
/// channel (their CA file): they follow the control service's move to the new root with
/// the bundle the CA hands them.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_minute_at_1000_requests_a_second_through_renewals_and_a_ca_rotation() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let control =
        ControlProcess::start_with(&d.join("control"), &["--cert-ttl-seconds", "4", "--tls"]).await;
    let first_root = d.join("first-root.pem");
    std::fs::copy(control.root_ca(), &first_root).unwrap();
    let args = |id: &str| {
        let mut a = control.proxy_args(id, &[], &d.join(id));
        let at = a.iter().position(|x| x == "--control-ca-file").unwrap();
        a[at + 1] = first_root.display().to_string();
        a
    };
    let app = Upstream::start("app").await;
    let b_token = token_file(&control, "b", d);
    let b = start(&inbound(&b_token, &app), args("b")).await;
    let a_token = token_file(&control, "a", d);
    let a = start(&outbound(&a_token, b.addr), args("a")).await;

    let before = ca_status(&control);
    assert_eq!(before["phase"], "", "{before}");
    let old = before["roots"][0]["fingerprint"]
        .as_str()
        .unwrap()
        .to_owned();
    let step = before["step_seconds"].as_u64().unwrap();
    assert_eq!(step, 6, "a step is a lifetime and a margin: {before}");

    // Watches serials, issuers and the CA's phases while the traffic flows; rotates at 10 s.
    let watch = async {
        let (mut serials, mut issuers, mut phases) = (
            (Vec::<String>::new(), Vec::<String>::new()),
            Vec::<String>::new(),
            Vec::<String>::new(),
        );
        let started = Instant::now();
        let mut rotated = false;
        for _ in 0..240 {
            if started.elapsed() > Duration::from_secs(60) {
                break;
            }
            if !rotated && started.elapsed() > Duration::from_secs(10) {
                let (code, out, err) = control.weftctl(&["ca", "rotate"]);
                assert_eq!(code, 0, "{err}");
                assert!(out.contains("distributing"), "{out}");
                // One rotation at a time.
                let (code, _, err) = control.weftctl(&["ca", "rotate"]);
                assert_ne!(code, 0);
                assert!(err.contains("a rotation is under way"), "{err}");
                rotated = true;
            }
            for (proxy, seen) in [(&a, &mut serials.0), (&b, &mut serials.1)] {
                let c = certs(proxy).await;
                let s = c["serial"].as_str().unwrap_or_default().to_owned();
                if !s.is_empty() && seen.last() != Some(&s) {
                    seen.push(s);
                }
                let i = c["issuer"].as_str().unwrap_or_default().to_owned();
                if !issuers.contains(&i) {
                    issuers.push(i);
                }
            }
            let phase = ca_status(&control)["phase"].as_str().unwrap().to_owned();
            if phases.last() != Some(&phase) {
                phases.push(phase);
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        (serials, issuers, phases)
    };
    let ((ok, failed), ((a_serials, b_serials), issuers, phases)) =
        tokio::join!(paced(&a, 1000, Duration::from_secs(60)), watch);
    assert!(
        failed.is_empty(),
        "{} of {} failed: {:?}\nA: {}\nB: {}",
        failed.len(),
        ok + failed.len(),
        &failed[..failed.len().min(5)],
        a.log(),
        b.log()
    );
    assert!(ok >= 59_000, "only {ok} requests answered");
    // Renewals about every 3 s on both sides.
    for (who, serials) in [("A", &a_serials), ("B", &b_serials)] {
        assert!(serials.len() >= 10, "{who} renewed: {serials:?}");
    }
    assert_eq!(
        phases,
        ["", "distributing", "switching", ""],
        "{}",
        control.log()
    );
    assert!(
        issuers
            .iter()
            .any(|i| i.ends_with("weft mesh root weft.local"))
            && issuers
                .iter()
                .any(|i| i.ends_with("weft mesh root weft.local #2")),
        "{issuers:?}"
    );
    // Both renewed from the new root over a control channel that had moved to it, with a
    // CA file of the old root only: the bundle from the CA is what let them.
    for proxy in [&a, &b] {
        let c = certs(proxy).await;
        assert!(
            c["issuer"].as_str().unwrap().ends_with("#2"),
            "{c}\n{}",
            proxy.log()
        );
        assert_eq!(c["trust_bundle_roots"], 1, "{c}");
    }
    // The old root is gone from the bundle, its key from the disk; the new root signs.
    let after = ca_status(&control);
    let roots = after["roots"].as_array().unwrap();
    assert_eq!(roots.len(), 1, "{after}");
    assert_ne!(roots[0]["fingerprint"], old.as_str());
    assert_eq!(roots[0]["signing"], true);
    let ca_dir = d.join("control").join("ca");
    assert!(
        ca_dir.join("root.pem").exists(),
        "the retired root stays as a record"
    );
    assert!(
        !ca_dir.join("root-key.pem").exists(),
        "the retired root's key is deleted"
    );
    let (_, bundle, _) = control.weftctl(&["ca", "bundle"]);
    assert_eq!(bundle, std::fs::read_to_string(control.root_ca()).unwrap());

    // The control service's own certificate moved to the new root: a client trusting only
    // the retired one is refused.
    let (code, err) = weftctl_raw(&[
        "--server",
        &control.url(),
        "--ca-file",
        first_root.to_str().unwrap(),
        "ca",
        "status",
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("UnknownIssuer"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_the_ca_a_proxy_serves_until_its_certificate_expires_then_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let port = free_port();
    let control_dir = d.join("control");
    let mut control =
        ControlProcess::start_full(&control_dir, port, None, &["--cert-ttl-seconds", "6"]).await;
    let app = Upstream::start("app").await;
    let Pair { a, b, .. } = enrolled_pair(&control, &app, d).await;
    assert_eq!(get(&h1_client(), &a.url("/x")).await.unwrap().status, 200);

    // The CA goes away: both keep serving with what they hold, and say they cannot renew.
    control.kill();
    let served = traffic(&a, 1, Duration::from_secs(2)).await;
    assert!(served.1.is_empty(), "{:?}", served.1);
    // Past expiry (6 s after the last renewal at most), mesh TLS is refused: new
    // connections (B closes each after 20 requests) fail.
    tokio::time::sleep(Duration::from_secs(7)).await;
    let mut refused = 0;
    for _ in 0..30 {
        if get(&h1_client(), &a.url("/late")).await.map(|g| g.status) != Ok(200) {
            refused += 1;
        }
    }
    assert!(
        refused >= 10,
        "an expired identity kept being served ({refused} of 30 refused)"
    );
    assert!(
        a.log().contains("cannot renew the mesh certificate"),
        "{}",
        a.log()
    );
    assert!(a.log().contains("has expired"), "{}", a.log());

    // The CA is back, with new tokens in the token files: both enroll again and recover.
    let control =
        ControlProcess::start_full(&control_dir, port, None, &["--cert-ttl-seconds", "6"]).await;
    token_file(&control, "a", d);
    token_file(&control, "b", d);
    let mut status = 0;
    for _ in 0..100 {
        status = get(&h1_client(), &a.url("/back"))
            .await
            .map(|g| g.status)
            .unwrap_or(0);
        if status == 200 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(status, 200, "{}\n{}", a.log(), b.log());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ca_signs_only_the_identity_of_the_token() {
    let dir = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(&dir.path().join("control")).await;
    let (code, token, err) = control.weftctl(&["identity", "token", "--service-account", "a"]);
    assert_eq!(code, 0, "{err}");
    let key = KeyPair::generate().unwrap();
    let csr = |uris: &[&str]| {
        let mut p = CertificateParams::default();
        p.subject_alt_names = uris
            .iter()
            .map(|u| SanType::URI((*u).try_into().unwrap()))
            .collect();
        p.serialize_request(&key).unwrap().der().to_vec()
    };
    let mut client = v1::identity_client::IdentityClient::connect(control.url())
        .await
        .unwrap();
    let sign = |csr_der: Vec<u8>, token: &str| v1::SignRequest {
        csr_der,
        credential: Some(v1::sign_request::Credential::JoinToken(
            token.trim().to_owned(),
        )),
    };
    // Garbage is not a CSR (and does not spend the token).
    let err = client
        .sign(sign(b"junk".to_vec(), &token))
        .await
        .unwrap_err();
    assert!(err.message().contains("not a valid CSR"), "{err:?}");
    // A CSR for another identity is refused, and the token is spent.
    let err = client
        .sign(sign(
            csr(&["spiffe://weft.local/ns/default/sa/admin"]),
            &token,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::PermissionDenied, "{err:?}");
    assert!(
        err.message().contains("but the credential is for"),
        "{err:?}"
    );
    let err = client.sign(sign(csr(&[A_ID]), &token)).await.unwrap_err();
    assert!(err.message().contains("already used"), "{err:?}");
    // A fresh token with a CSR naming its own identity (or none) gets exactly that.
    let (_, token, _) = control.weftctl(&["identity", "token", "--service-account", "a"]);
    let signed = client
        .sign(sign(csr(&[A_ID]), &token))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(signed.spiffe_id, A_ID);
    assert_eq!(signed.cert_chain_der.len(), 1);
    assert_eq!(signed.trust_bundle_der.len(), 1);
    // A renewal with someone else's certificate is refused.
    let other = KeyPair::generate().unwrap();
    let foreign = CertificateParams::default()
        .serialize_request(&other)
        .unwrap()
        .der()
        .to_vec();
    let err = client
        .sign(v1::SignRequest {
            csr_der: foreign,
            credential: Some(v1::sign_request::Credential::CurrentCertDer(
                signed.cert_chain_der[0].clone(),
            )),
        })
        .await
        .unwrap_err();
    assert!(
        err.message().contains("key of the current certificate"),
        "{err:?}"
    );
}

/// `weftctl` with exactly `args` (no defaults from the harness): exit code and stderr.
fn weftctl_raw(args: &[&str]) -> (i32, String) {
    let out = std::process::Command::new(workspace_bin("weftctl"))
        .args(args)
        .env_remove("WEFT_CONTROL_CA")
        .env_remove("WEFT_TOKEN")
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_control_channel_runs_over_tls_and_https_is_never_plaintext() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let control = ControlProcess::start_with(&d.join("control"), &["--tls"]).await;
    let https = format!("https://{}", control.addr);
    let http = format!("http://{}", control.addr);
    let root = control.root_ca().display().to_string();

    // Verified against the mesh root: works.
    let (code, _, err) = control.weftctl(&["module", "ls"]);
    assert_eq!(code, 0, "{err}");
    // https without a CA is refused before anything is sent, saying why.
    let (code, err) = weftctl_raw(&["--server", &https, "module", "ls"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is https: give the CA"), "{err}");
    // Plaintext to the TLS endpoint does not work, and a CA file with http:// is an error.
    let (code, err) = weftctl_raw(&["--server", &http, "module", "ls"]);
    assert_ne!(code, 0, "plaintext reached a TLS endpoint: {err}");
    let (code, err) = weftctl_raw(&["--server", &http, "--ca-file", &root, "module", "ls"]);
    assert_eq!(code, 1);
    assert!(err.contains("is plaintext: use https://"), "{err}");
    // A CA that did not sign the service's certificate: refused.
    let stranger = weft_tests::pki::Ca::new("stranger").write_bundle(d, "stranger.pem");
    let stranger = stranger.display().to_string();
    let (code, err) = weftctl_raw(&["--server", &https, "--ca-file", &stranger, "module", "ls"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("cannot reach the control service"), "{err}");
    assert!(err.contains("UnknownIssuer"), "the cause is named: {err}");

    // Beyond loopback, plaintext only when asked for by name.
    let out = std::process::Command::new(workspace_bin("weft-control"))
        .arg("--data-dir")
        .arg(d.join("beyond"))
        .args(["--listen", &format!("0.0.0.0:{}", free_port())])
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("is beyond loopback: serve it with --tls"),
        "{err}"
    );

    // Proxies follow it over TLS and get their identities through it.
    let app = Upstream::start("app").await;
    let Pair {
        a, b: _b, b_token, ..
    } = enrolled_pair(&control, &app, d).await; // `_b` holds B's process until the end
    assert_eq!(
        get(&h1_client(), &a.url("/over-tls")).await.unwrap().status,
        200
    );
    let (code, out, err) = control.weftctl(&["get", "proxies"]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("a ") && out.contains("b "), "{out}");

    // A proxy given https:// without a CA stops at startup.
    let (status, err) = run_proxy_args_expecting_failure(
        &inbound(&b_token, &app),
        &["--control", &https, "--id", "c"],
    );
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(err.contains("is https: give the CA"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registered_instance_must_prove_the_identity_it_registered_with() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let control = ControlProcess::start(&d.join("control")).await;
    let app = Upstream::start("app").await;
    let b_token = token_file(&control, "b", d);
    let b = start(
        &inbound(&b_token, &app),
        control.proxy_args("b", &[], &d.join("b")),
    )
    .await;
    // A's cluster `b` gets its endpoints from the registry (service `svc-b`).
    let manifest = "kind: Cluster\nname: b\nselector: { app: a }\nspec:\n  service: svc-b\n";
    let (code, _, err) = control.weftctl_stdin(&["apply", "-f", "-"], Some(manifest));
    assert_eq!(code, 0, "{err}");
    let a_token = token_file(&control, "a", d);
    let a_cfg = outbound(&a_token, b.addr).replace(
        &format!(
            "endpoints: [ {{ address: \"{}\", identity: \"{B_ID}\" }} ]",
            b.addr
        ),
        "endpoints: []",
    );
    let a = start(&a_cfg, control.proxy_args("a", &["app=a"], &d.join("a"))).await;
    let register = |identity: &str| {
        let addr = b.addr.to_string();
        let (code, _, err) = control.weftctl(&[
            "register",
            "svc-b",
            &addr,
            "--ttl",
            "60",
            "--identity",
            identity,
        ]);
        assert_eq!(code, 0, "{err}");
    };
    let status_soon = |want: u16| {
        let url = a.url("/x");
        async move {
            let mut got = 0;
            for _ in 0..100 {
                got = get(&h1_client(), &url).await.map(|g| g.status).unwrap_or(0);
                if got == want {
                    break;
                }
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            got
        }
    };
    register(B_ID);
    assert_eq!(status_soon(200).await, 200, "{}", a.log());
    // The same address registered as someone else: B cannot prove that, so A refuses it.
    register("spiffe://weft.local/ns/default/sa/c");
    assert_eq!(status_soon(503).await, 503, "{}", a.log());
    let stats = a.stats().await;
    assert!(
        metric_value(&stats, "weft_upstream_tls_failures_total{cluster=\"b\"}").unwrap_or(0.0)
            >= 1.0,
        "{stats}"
    );
    // A bad SPIFFE ID is refused at registration.
    let addr = b.addr.to_string();
    let (code, _, err) =
        control.weftctl(&["register", "svc-b", &addr, "--identity", "https://nope"]);
    assert_eq!(code, 1);
    assert!(err.contains("identity"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reusable_token_enrolls_every_replica_until_it_expires() {
    let dir = tempfile::tempdir().unwrap();
    let control = ControlProcess::start(&dir.path().join("control")).await;
    let mint = |extra: &[&str]| {
        let mut args = vec!["identity", "token", "--service-account", "a"];
        args.extend_from_slice(extra);
        let (code, token, err) = control.weftctl(&args);
        assert_eq!(code, 0, "{err}");
        token.trim().to_owned()
    };
    let mut client = v1::identity_client::IdentityClient::connect(control.url())
        .await
        .unwrap();
    let csr = || {
        let key = KeyPair::generate().unwrap();
        let mut p = CertificateParams::default();
        p.subject_alt_names = vec![SanType::URI(A_ID.try_into().unwrap())];
        p.serialize_request(&key).unwrap().der().to_vec()
    };
    let sign = |token: &str| v1::SignRequest {
        csr_der: csr(),
        credential: Some(v1::sign_request::Credential::JoinToken(token.to_owned())),
    };
    // Three replicas of one workload, one Secret: each gets the identity, with its own key.
    let shared = mint(&["--reusable"]);
    let mut serials = std::collections::BTreeSet::new();
    for _ in 0..3 {
        let signed = client.sign(sign(&shared)).await.unwrap().into_inner();
        assert_eq!(signed.spiffe_id, A_ID);
        serials.insert(signed.cert_chain_der[0].clone());
    }
    assert_eq!(serials.len(), 3, "three distinct certificates");
    // An ordinary token still works once.
    let once = mint(&[]);
    client.sign(sign(&once)).await.unwrap();
    let err = client.sign(sign(&once)).await.unwrap_err();
    assert!(err.message().contains("already used"), "{err:?}");
    // A reusable token stops at its expiry like any other.
    let short = mint(&["--reusable", "--ttl-seconds", "1"]);
    client.sign(sign(&short)).await.unwrap();
    tokio::time::sleep(Duration::from_millis(1_100)).await;
    let err = client.sign(sign(&short)).await.unwrap_err();
    assert!(err.message().contains("expired"), "{err:?}");
}
