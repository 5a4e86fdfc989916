//! Transparent capture, as a pod runs it: two hosts (network namespaces made by the test,
//! linked by a veth pair), each with `weft-proxy init`'s iptables rules and a sidecar running
//! as the proxy's own user. The client knows nothing of Weft: it calls the other host's
//! address, and the call crosses both sidecars (mesh mTLS between them) — HTTP, a protocol
//! where the server speaks first on an ordinary port and on a declared opaque one, and a
//! port no cluster owns (passthrough, then blocked by config). `--undo` takes the rules out.

use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use weft_tests::netns::{Netns, NsProxy, PROXY_UID, world_readable};
use weft_tests::pki::{Ca, Leaf, LeafFiles};
use weft_tests::*;

const CLIENT_IP: &str = "10.77.0.1";
const SERVER_IP: &str = "10.77.0.2";
/// A service's virtual address (a ClusterIP): no host has it.
const VIP: &str = "10.77.0.100:80";
const A_ID: &str = "spiffe://weft.local/ns/default/sa/client";
const B_ID: &str = "spiffe://weft.local/ns/default/sa/server";

fn identity(leaf: &LeafFiles, bundle: &Path) -> String {
    for f in [&leaf.cert, &leaf.key, &bundle.to_path_buf()] {
        world_readable(f);
    }
    format!(
        "identity: {{ cert_file: \"{}\", key_file: \"{}\", trust_bundle_file: \"{}\" }}\n",
        leaf.cert.display(),
        leaf.key.display(),
        bundle.display()
    )
}

/// The client host's sidecar: outbound capture, the server's services as mesh clusters.
fn client_sidecar(identity: &str, passthrough: bool) -> String {
    let mesh = "    tls: { mode: mesh }\n    connect_timeout_ms: 2000\n";
    format!(
        "admin: {{ address: \"127.0.0.1:15000\" }}
{identity}listeners:
  - name: outbound
    address: \"0.0.0.0:15001\"
    direction: outbound
    capture: {{ passthrough: {passthrough} }}
clusters:
  - name: web
    endpoints: [ {{ address: \"{SERVER_IP}:8080\", identity: \"{B_ID}\" }} ]
{mesh}  - name: app.test
    endpoints: [ {{ address: \"{SERVER_IP}:8443\" }} ]
  - name: web-vip
    addresses: [ \"{VIP}\" ]
    endpoints: [ {{ address: \"{SERVER_IP}:8080\", identity: \"{B_ID}\" }} ]
{mesh}  - name: smtp
    endpoints: [ {{ address: \"{SERVER_IP}:2525\", identity: \"{B_ID}\" }} ]
{mesh}  - name: mysql
    endpoints: [ {{ address: \"{SERVER_IP}:3306\", identity: \"{B_ID}\" }} ]
{mesh}"
    )
}

/// The server host's sidecar: inbound capture with permissive mesh TLS; its web port goes to
/// the local app through a cluster, the rest straight to where it was going.
fn server_sidecar(identity: &str) -> String {
    format!(
        "admin: {{ address: \"127.0.0.1:15000\" }}
{identity}listeners:
  - name: inbound
    address: \"0.0.0.0:15006\"
    direction: inbound
    tls: {{ mode: permissive }}
    capture: {{ ports: {{ 8080: app }} }}
clusters:
  - name: app
    endpoints: [ {{ address: \"127.0.0.1:8080\" }} ]
"
    )
}

fn stat(stats: &str, series: &str) -> f64 {
    metric_value(stats, series).unwrap_or(0.0)
}

/// `curl https://app.test:8443{path}` from `ns`, app.test resolved to `ip` and verified
/// against `ca`: the status code ("000" when none) and what curl said.
fn curl_https(ns: &Netns, ca: &Path, ip: &str, path: &str) -> (String, String) {
    let out = ns
        .command(Path::new("curl"))
        .args([
            "-sS",
            "-o",
            "/dev/null",
            "-w",
            "%{http_code}",
            "--max-time",
            "10",
        ])
        .arg("--cacert")
        .arg(ca)
        .args(["--resolve", &format!("app.test:8443:{ip}")])
        .arg(format!("https://app.test:8443{path}"))
        .output()
        .expect("curl");
    (
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A mesh root and the two hosts' identities (the `identity` sections of their sidecars), in
/// a directory their user can read.
fn identities() -> (tempfile::TempDir, String, String) {
    let dir = tempfile::tempdir().unwrap();
    world_readable(dir.path());
    let ca = Ca::new("mesh root");
    let bundle = ca.write_bundle(dir.path(), "bundle.pem");
    let a_id = identity(&ca.issue(&Leaf::spiffe(A_ID), dir.path(), "a"), &bundle);
    let b_id = identity(&ca.issue(&Leaf::spiffe(B_ID), dir.path(), "b"), &bundle);
    (dir, a_id, b_id)
}

fn init(ns: &Netns, args: &[&str]) {
    let out = ns
        .command(&proxy_bin())
        .arg("init")
        .args(["--proxy-uid", &PROXY_UID.to_string()])
        .args(args)
        .output()
        .expect("weft-proxy init");
    assert!(
        out.status.success(),
        "weft-proxy init {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test]
async fn an_app_calls_another_by_address_and_the_call_crosses_both_sidecars() {
    let (dir, a_id, b_id) = identities();

    let (client, server) = (Netns::new(), Netns::new());
    client.link(CLIENT_IP, &server, SERVER_IP);
    let any = |port| SocketAddr::from(([0, 0, 0, 0], port));
    let app = server
        .run(async move {
            let app = Upstream::start_at("web", any(8080)).await;
            let addr = app.addr;
            // Serves for as long as the namespace's runtime runs.
            std::mem::forget(app);
            addr
        })
        .await;
    assert_eq!(app.port(), 8080);
    server.run(greeter(any(2525), "smtp")).await;
    server.run(greeter(any(3306), "mysql")).await;
    server.run(greeter(any(9000), "unlisted")).await;

    let admin = SocketAddr::from(([127, 0, 0, 1], 15000));
    let b = NsProxy::start(&server, &server_sidecar(&b_id), admin).await;
    let a = NsProxy::start(&client, &client_sidecar(&a_id, true), admin).await;
    init(&server, &[]);
    init(&client, &[]);
    let rules = client.nat_rules();
    assert!(rules.contains("-A OUTPUT -p tcp -j WEFT_OUTPUT"), "{rules}");
    assert!(
        rules.contains(&format!("--uid-owner {PROXY_UID} -j RETURN")),
        "{rules}"
    );

    // A capture listener reached directly (not redirected) is no open proxy into the mesh.
    let direct = client
        .run(raw_request(
            SocketAddr::from(([127, 0, 0, 1], 15001)),
            b"GET / HTTP/1.1\r\nhost: web\r\n\r\n",
        ))
        .await;
    assert!(
        direct.as_deref().is_ok_and(str::is_empty) || direct.is_err(),
        "closed with no answer: {direct:?}"
    );

    // HTTP: the app calls 10.77.0.2:8080 as if there were no mesh.
    let url = format!("http://{SERVER_IP}:8080/hello");
    let got = client
        .run(async move { get(&h1_client(), &url).await })
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{e}\nclient sidecar:\n{}\nserver sidecar:\n{}",
                a.log(),
                b.log()
            )
        });
    assert_eq!(got.status, 200, "{}", b.log());
    assert_eq!(got.header("x-upstream"), "web");
    let echo = got.echo();
    assert_eq!(
        echo["headers"]["x-forwarded-proto"][0], "https",
        "the hop between the sidecars was mesh TLS: {echo}"
    );
    let a_stats = a.stats(&client).await;
    let b_stats = b.stats(&server).await;
    assert_eq!(
        stat(
            &a_stats,
            "weft_requests_total{listener=\"outbound\",cluster=\"web\",status_class=\"2xx\"}"
        ),
        1.0,
        "{a_stats}"
    );
    assert_eq!(
        stat(
            &b_stats,
            "weft_requests_total{listener=\"inbound\",cluster=\"app\",status_class=\"2xx\"}"
        ),
        1.0,
        "{b_stats}"
    );
    assert_eq!(
        stat(
            &a_stats,
            "weft_protocol_detections_total{listener=\"outbound\",protocol=\"http1\"}"
        ),
        1.0
    );
    assert_eq!(
        stat(
            &b_stats,
            "weft_protocol_detections_total{listener=\"inbound\",protocol=\"tls\"}"
        ),
        1.0
    );

    // A virtual address no host has (a Kubernetes ClusterIP): the cluster that lists it.
    let url = format!("http://{VIP}/vip");
    let got = client
        .run(async move { get(&h1_client(), &url).await })
        .await
        .unwrap();
    assert_eq!((got.status, got.header("x-upstream")), (200, "web"));
    let a_stats = a.stats(&client).await;
    assert_eq!(
        stat(
            &a_stats,
            "weft_requests_total{listener=\"outbound\",cluster=\"web-vip\",status_class=\"2xx\"}"
        ),
        1.0,
        "{a_stats}"
    );

    // The server speaks first on an ordinary port: detection gives up after its short wait
    // (the client says nothing) and the bytes flow, over mesh TLS, both ways with half-close.
    let smtp = SocketAddr::new(SERVER_IP.parse().unwrap(), 2525);
    let (greeting, waited, rest) = client
        .run(converse(smtp, "ehlo client\r\n"))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}\n{}", a.log(), b.log()));
    assert_eq!(greeting, "220 smtp\r\n");
    assert_eq!(rest, "EHLO CLIENT\r\nbye smtp\r\n");
    println!("server-first greeting on a detected port after {waited:?}");
    assert!(
        waited < Duration::from_secs(3),
        "Linkerd's 10 s wait is not ours: {waited:?}"
    );
    // On a declared opaque port there is no wait at all.
    let mysql = SocketAddr::new(SERVER_IP.parse().unwrap(), 3306);
    let (greeting, waited_opaque, rest) = client.run(converse(mysql, "select 1")).await.unwrap();
    assert_eq!(
        (greeting.as_str(), rest.as_str()),
        ("220 mysql\r\n", "SELECT 1bye mysql\r\n")
    );
    println!("server-first greeting on a declared opaque port after {waited_opaque:?}");

    let a_stats = a.stats(&client).await;
    let b_stats = b.stats(&server).await;
    for cluster in ["smtp", "mysql"] {
        assert_eq!(
            stat(
                &a_stats,
                &format!(
                    "weft_tcp_connections_total{{listener=\"outbound\",cluster=\"{cluster}\"}}"
                )
            ),
            1.0,
            "{a_stats}"
        );
    }
    assert_eq!(
        stat(
            &a_stats,
            "weft_protocol_detections_total{listener=\"outbound\",protocol=\"silent\"}"
        ),
        1.0
    );
    assert_eq!(
        stat(
            &a_stats,
            "weft_protocol_detections_total{listener=\"outbound\",protocol=\"declared\"}"
        ),
        1.0
    );
    // The server's sidecar took both as opaque TCP inside mesh TLS (ALPN weft-tcp), and sent
    // them on to where they were going.
    assert_eq!(
        stat(
            &b_stats,
            "weft_tcp_connections_total{listener=\"inbound\",cluster=\"passthrough\"}"
        ),
        2.0,
        "{b_stats}"
    );
    assert_eq!(
        stat(
            &b_stats,
            "weft_downstream_tls_connections_total{listener=\"inbound\"}"
        ),
        4.0,
        "one mesh TLS connection each: web, web-vip, smtp, mysql"
    );

    // An app that terminates its own TLS (here an edge-TLS proxy in front of the web app):
    // its clients' TLS, which is not a sidecar's, passes the permissive inbound listener
    // untouched (told apart by the ClientHello: no `weft-mesh` offered).
    let app_ca = Ca::new("the app's own root");
    let app_ca_file = app_ca.write_bundle(dir.path(), "app-ca.pem");
    let app_cert = app_ca.issue(&Leaf::dns(&["app.test"]), dir.path(), "app");
    for f in [&app_cert.cert, &app_cert.key, &app_ca_file] {
        world_readable(f);
    }
    let tls_app = NsProxy::start(
        &server,
        &format!(
            "admin: {{ address: \"127.0.0.1:15100\" }}
listeners:
  - name: tls-app
    address: \"0.0.0.0:8443\"
    default_cluster: web
    tls: {{ mode: simple, certificates: [ {{ cert_file: \"{}\", key_file: \"{}\" }} ] }}
clusters:
  - name: web
    endpoints: [ {{ address: \"127.0.0.1:8080\" }} ]
",
            app_cert.cert.display(),
            app_cert.key.display()
        ),
        SocketAddr::from(([127, 0, 0, 1], 15100)),
    )
    .await;
    let (code, err) = curl_https(&client, &app_ca_file, SERVER_IP, "/own-tls");
    assert_eq!(code, "200", "{err}\n{}\n{}", b.log(), tls_app.log());
    let b_stats = b.stats(&server).await;
    assert_eq!(
        stat(
            &b_stats,
            "weft_protocol_detections_total{listener=\"inbound\",protocol=\"tls_passthrough\"}"
        ),
        1.0,
        "{b_stats}"
    );

    // Egress by server name: the client resolved app.test to an address nobody has, and the
    // TLS it sends names app.test, a cluster of the client's sidecar: it goes there.
    let (code, err) = curl_https(&client, &app_ca_file, "10.77.0.99", "/by-sni");
    assert_eq!(code, "200", "{err}\n{}", a.log());
    let a_stats = a.stats(&client).await;
    assert_eq!(
        stat(
            &a_stats,
            "weft_protocol_detections_total{listener=\"outbound\",protocol=\"tls_sni\"}"
        ),
        1.0,
        "{a_stats}"
    );
    assert_eq!(
        stat(
            &a_stats,
            "weft_tcp_connections_total{listener=\"outbound\",cluster=\"app.test\"}"
        ),
        2.0,
        "the call before by its address (an endpoint of app.test), this one by its name: {a_stats}"
    );

    // A port no cluster owns: straight through (passthrough), plaintext, on both sides.
    let unlisted = SocketAddr::new(SERVER_IP.parse().unwrap(), 9000);
    let (greeting, _, rest) = client.run(converse(unlisted, "hi")).await.unwrap();
    assert_eq!(
        (greeting.as_str(), rest.as_str()),
        ("220 unlisted\r\n", "HIbye unlisted\r\n")
    );
    let a_stats = a.stats(&client).await;
    assert_eq!(
        stat(
            &a_stats,
            "weft_tcp_connections_total{listener=\"outbound\",cluster=\"passthrough\"}"
        ),
        1.0,
        "{a_stats}"
    );

    // Passthrough off: the same call is closed, and counted.
    a.reload(&client_sidecar(&a_id, false));
    let mut blocked = None;
    for _ in 0..100 {
        match client.run(converse(unlisted, "hi")).await {
            Err(e) => {
                blocked = Some(e);
                break;
            }
            Ok(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
    let e = blocked.unwrap_or_else(|| panic!("passthrough stayed on:\n{}", a.log()));
    assert_eq!(e.kind(), std::io::ErrorKind::UnexpectedEof, "{e}");
    let a_stats = a.stats(&client).await;
    assert!(
        stat(
            &a_stats,
            "weft_tcp_refused_total{listener=\"outbound\",cluster=\"passthrough\"}"
        ) >= 1.0,
        "{a_stats}"
    );
    // Mesh services still work after the reload.
    let url = format!("http://{SERVER_IP}:8080/again");
    let got = client
        .run(async move { get(&h1_client(), &url).await })
        .await
        .unwrap();
    assert_eq!(got.status, 200);

    // Undo: the client's rules are gone, and its calls no longer go through its sidecar.
    let passthrough = "weft_tcp_connections_total{listener=\"outbound\",cluster=\"passthrough\"}";
    let before = stat(&a.stats(&client).await, passthrough);
    init(&client, &["--undo"]);
    let rules = client.nat_rules();
    assert!(!rules.contains("WEFT"), "{rules}");
    let (greeting, _, _) = client.run(converse(unlisted, "direct")).await.unwrap();
    assert_eq!(greeting, "220 unlisted\r\n");
    let after = a.stats(&client).await;
    assert_eq!(
        stat(&after, passthrough),
        before,
        "the direct call did not cross the client's sidecar"
    );
}

#[tokio::test]
async fn ipv6_calls_are_captured_on_dual_stack_listeners_with_ipv4_alongside() {
    let (_dir, a_id, b_id) = identities();
    let (client, server) = (Netns::new(), Netns::new());
    client.link_with(
        &["10.78.0.1/24", "fd78::1/64"],
        &server,
        &["10.78.0.2/24", "fd78::2/64"],
    );
    // The app and a server-first service listen on both families (`[::]`, dual-stack).
    let any6 = |port| SocketAddr::from((std::net::Ipv6Addr::UNSPECIFIED, port));
    server
        .run(async move { std::mem::forget(Upstream::start_at("web", any6(8080)).await) })
        .await;
    server.run(greeter(any6(2525), "smtp")).await;

    let mesh = "    tls: { mode: mesh }\n    connect_timeout_ms: 2000\n";
    let client_yaml = format!(
        "admin: {{ address: \"127.0.0.1:15000\" }}
{a_id}listeners:
  - name: outbound
    address: \"[::]:15001\"
    direction: outbound
    capture: {{}}
clusters:
  - name: web6
    endpoints: [ {{ address: \"[fd78::2]:8080\", identity: \"{B_ID}\" }} ]
{mesh}  - name: web4
    endpoints: [ {{ address: \"10.78.0.2:8080\", identity: \"{B_ID}\" }} ]
{mesh}  - name: smtp6
    endpoints: [ {{ address: \"[fd78::2]:2525\", identity: \"{B_ID}\" }} ]
{mesh}"
    );
    let server_yaml = server_sidecar(&b_id).replace("\"0.0.0.0:15006\"", "\"[::]:15006\"");
    assert!(server_yaml.contains("[::]:15006"));
    let admin = SocketAddr::from(([127, 0, 0, 1], 15000));
    let b = NsProxy::start(&server, &server_yaml, admin).await;
    let a = NsProxy::start(&client, &client_yaml, admin).await;
    init(&server, &["--ipv6"]);
    init(&client, &["--ipv6"]);
    let rules6 = client.nat_rules6();
    assert!(
        rules6.contains("-A OUTPUT -p tcp -j WEFT_OUTPUT"),
        "{rules6}"
    );

    for (url, cluster) in [
        ("http://[fd78::2]:8080/six", "web6"),
        ("http://10.78.0.2:8080/four", "web4"),
    ] {
        let u = url.to_owned();
        let got = client
            .run(async move { get(&h1_client(), &u).await })
            .await
            .unwrap_or_else(|e| panic!("{url}: {e}\n{}\n{}", a.log(), b.log()));
        assert_eq!(
            (got.status, got.header("x-upstream")),
            (200, "web"),
            "{url}"
        );
        assert_eq!(
            got.echo()["headers"]["x-forwarded-proto"][0],
            "https",
            "{url}"
        );
        let stats = a.stats(&client).await;
        let series = format!(
            "weft_requests_total{{listener=\"outbound\",cluster=\"{cluster}\",status_class=\"2xx\"}}"
        );
        assert_eq!(stat(&stats, &series), 1.0, "{url}: {stats}");
    }
    // Opaque TCP over IPv6, the server speaking first.
    let smtp = SocketAddr::new("fd78::2".parse().unwrap(), 2525);
    let (greeting, _, rest) = client.run(converse(smtp, "v6\r\n")).await.unwrap();
    assert_eq!(
        (greeting.as_str(), rest.as_str()),
        ("220 smtp\r\n", "V6\r\nbye smtp\r\n")
    );
    let stats = a.stats(&client).await;
    assert_eq!(
        stat(
            &stats,
            "weft_tcp_connections_total{listener=\"outbound\",cluster=\"smtp6\"}"
        ),
        1.0,
        "{stats}"
    );

    // Undo without --ipv6 still takes the IPv6 rules out.
    init(&client, &["--undo"]);
    assert!(!client.nat_rules6().contains("WEFT"));
    assert!(!client.nat_rules().contains("WEFT"));
}
