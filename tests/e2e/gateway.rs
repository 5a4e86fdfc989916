//! Gateway API routes for the mesh (GAMMA) end to end: `weftctl apply -f` of
//! `gateway.networking.k8s.io/v1` HTTPRoutes and GRPCRoutes whose parentRefs name Services,
//! enforced by a client sidecar (real `weft-control`, `weftctl`, `weft-proxy` and the standard
//! router and retry filters, upstreams on loopback): matches, weighted backends, header
//! modifiers, rewrites, redirects, mirrors, timeouts, retries; status; refusals.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http_body_util::Full;
use weft_tests::*;

use crate::control::{apply, eventually, follower, proxy_status};

/// A bootstrap with one outbound listener routing by authority and no cluster.
fn outbound() -> String {
    format!(
        "admin: {{ address: \"{{admin}}\" }}
wasm: {{ cache_dir: \"{}\" }}
listeners:
  - name: outbound
    address: \"{{listen}}\"
    direction: outbound
clusters: []
",
        shared_module_cache().display()
    )
}

/// The client sidecars' chain: the router runs the mesh's routes, the retry filter their
/// retry policies.
const CHAIN: &str = "kind: Chain
name: client-outbound
selector: {app: client}
spec:
  listener: outbound
  filters:
    - {name: router, module: router, config_ref: mesh-routes}
    - {name: retry, module: retry, config_ref: mesh-retries}
";

/// `method path` through `proxy` to `host`, with `headers`.
async fn call(
    proxy: &ProxyProcess,
    method: &str,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Got {
    let mut req = http::Request::builder()
        .method(method)
        .uri(proxy.url(path))
        .header(http::header::HOST, host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(Bytes::new())).expect("request");
    send(&h1_client(), req).await.expect("call")
}

fn register(control: &ControlProcess, service: &str, address: &str) {
    let (code, out, err) = control.weftctl(&["register", service, address, "--ttl", "300"]);
    assert_eq!(code, 0, "register: {out}{err}");
}

fn push(control: &ControlProcess, name: &str) {
    let module = standard_filter(&format!("weft_filter_{name}"));
    let (code, out, err) = control.weftctl(&[
        "module",
        "push",
        module.to_str().expect("path"),
        "--name",
        name,
    ]);
    assert_eq!(code, 0, "push: {out}{err}");
}

const ROUTES: &str = "apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: echo-canary, namespace: shop}
spec:
  parentRefs: [{group: \"\", kind: Service, name: echo, port: 80}]
  rules:
    - backendRefs:
        - {name: echo-v1, port: 80, weight: 80}
        - {name: echo-v2, port: 80, weight: 20}
    - matches:
        - {path: {type: Exact, value: /login}, method: POST}
        - headers: [{name: x-canary, value: \"1\"}]
        - queryParams: [{type: RegularExpression, name: user, value: \"beta-[0-9]+\"}]
      backendRefs: [{name: echo-v2, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /api}}]
      filters:
        - type: RequestHeaderModifier
          requestHeaderModifier:
            set: [{name: x-env, value: prod}]
            add: [{name: x-via, value: weft}]
            remove: [x-debug]
        - type: ResponseHeaderModifier
          responseHeaderModifier: {set: [{name: x-served-by, value: mesh}]}
        - type: URLRewrite
          urlRewrite: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /v2}}
      backendRefs: [{name: echo-v1, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /old}}]
      filters:
        - type: RequestRedirect
          requestRedirect: {path: {type: ReplacePrefixMatch, replacePrefixMatch: /new}, statusCode: 301}
        - type: ResponseHeaderModifier
          responseHeaderModifier: {set: [{name: cache-control, value: no-store}]}
    - matches: [{path: {type: PathPrefix, value: /slow}}]
      timeouts: {request: 300ms}
      filters:
        - type: URLRewrite
          urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /delay/1500}}
      backendRefs: [{name: echo-v1, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /flaky}}]
      retry: {codes: [503], attempts: 2, backoff: 10ms}
      filters:
        - type: URLRewrite
          urlRewrite: {path: {type: ReplaceFullPath, replaceFullPath: /fail-first/2}}
      backendRefs: [{name: flaky, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /shadowed}}]
      filters:
        - type: RequestMirror
          requestMirror: {backendRef: {name: shadow, port: 80}}
      backendRefs: [{name: echo-v1, port: 80}]
    - matches: [{path: {type: PathPrefix, value: /missing}}]
      backendRefs: [{name: nowhere, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: GRPCRoute
metadata: {name: greeter, namespace: shop}
spec:
  parentRefs: [{kind: Service, name: greeter}]
  rules:
    - matches: [{method: {service: helloworld.Greeter, method: SayHello}}]
      backendRefs: [{name: echo-v2, port: 50051}]
    - backendRefs: [{name: echo-v1, port: 50051}]
";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn httproutes_and_grpcroutes_for_services_are_enforced_by_client_sidecars() {
    let dir = tempfile::tempdir().expect("tempdir");
    let control = ControlProcess::start(&dir.path().join("data")).await;
    let v1 = Upstream::start("echo-v1").await;
    let v2 = Upstream::start("echo-v2").await;
    let flaky = Upstream::start("flaky").await;
    let shadow = Recorder::start().await;
    let other = Upstream::start("other").await;
    for (service, u) in [
        ("echo", &v1),
        ("echo-v1", &v1),
        ("echo-v2", &v2),
        ("flaky", &flaky),
        ("greeter", &v1),
        ("other", &other),
    ] {
        register(&control, service, &u.address());
    }
    register(&control, "shadow", &shadow.addr.to_string());
    push(&control, "router");
    push(&control, "retry");
    apply(&control, CHAIN);
    let out = apply(&control, ROUTES);
    assert!(
        out.contains("echo-canary") && out.contains("greeter"),
        "{out}"
    );
    let proxy = Arc::new(
        follower(
            &control,
            &outbound(),
            1,
            "client-1",
            "app=client",
            &dir.path().join("p"),
        )
        .await,
    );
    let (c, p) = (&control, &proxy);
    eventually(
        "the routes on the sidecar",
        Duration::from_secs(60),
        || async move {
            proxy_status(c, "client-1")["synced_version"].as_u64() > Some(0)
                && call(p, "GET", "echo.shop.svc.cluster.local", "/login", &[])
                    .await
                    .status
                    == 200
        },
    )
    .await;

    // Weighted backends: 80/20 (the router's split interleaves evenly).
    let mut to_v2 = 0;
    for _ in 0..100 {
        let got = call(&proxy, "GET", "echo", "/", &[]).await;
        assert_eq!(got.status, 200, "{got:?}");
        to_v2 += usize::from(got.header("x-upstream") == "echo-v2");
    }
    assert!((15..=25).contains(&to_v2), "20% to v2: {to_v2}");

    // Matches: exact path + method, header, query parameter (regex); anything else goes by
    // the weights of the first rule.
    let upstream = |g: &Got| g.header("x-upstream").to_owned();
    assert_eq!(
        upstream(&call(&proxy, "POST", "echo:80", "/login", &[]).await),
        "echo-v2"
    );
    assert_eq!(
        upstream(&call(&proxy, "GET", "echo", "/x", &[("x-canary", "1")]).await),
        "echo-v2"
    );
    assert_eq!(
        upstream(&call(&proxy, "GET", "echo", "/x?user=beta-42", &[]).await),
        "echo-v2"
    );
    // Another port is another parent: these routes do not apply; the authority's own
    // cluster (echo) answers.
    assert_eq!(
        upstream(&call(&proxy, "GET", "echo:8080", "/x", &[("x-canary", "1")]).await),
        "echo-v1"
    );

    // PathPrefix is segment-aware; header modifiers and a prefix rewrite.
    let got = call(
        &proxy,
        "GET",
        "echo",
        "/api/users?id=7",
        &[("x-debug", "1"), ("x-via", "client")],
    )
    .await;
    assert_eq!(got.status, 200);
    let echo = got.echo();
    assert_eq!(echo["uri"], "/v2/users?id=7", "{echo}");
    assert_eq!(echo["headers"]["x-env"], serde_json::json!(["prod"]));
    assert_eq!(
        echo["headers"]["x-via"],
        serde_json::json!(["client", "weft"])
    );
    assert!(echo["headers"].get("x-debug").is_none(), "{echo}");
    assert_eq!(got.header("x-served-by"), "mesh");
    let got = call(&proxy, "GET", "echo", "/apix", &[]).await;
    assert_ne!(got.echo()["uri"], "/v2x", "/apix is not under /api");

    // Redirect.
    let got = call(&proxy, "GET", "echo", "/old/page?q=1", &[]).await;
    assert_eq!(got.status, 301);
    assert_eq!(got.header("location"), "http://echo/new/page?q=1");
    assert_eq!(
        got.header("cache-control"),
        "no-store",
        "the rule's response headers"
    );

    // Request timeout.
    let started = std::time::Instant::now();
    let got = call(&proxy, "GET", "echo", "/slow", &[]).await;
    assert_eq!(got.status, 504, "{got:?}");
    assert!(started.elapsed() < Duration::from_millis(1400));

    // Retry (GEP-1731): two 503s, then an answer, within 2 retries.
    let got = call(&proxy, "GET", "echo", "/flaky", &[]).await;
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(flaky.hits(), 3);

    // Mirror: the shadow service gets a copy; the client sees echo-v1's answer.
    let got = call(&proxy, "GET", "echo", "/shadowed", &[]).await;
    assert_eq!(upstream(&got), "echo-v1", "{got:?} {}", proxy.log());
    let s = &shadow;
    eventually(
        "the mirrored copy",
        Duration::from_secs(10),
        || async move { s.seen().len() == 1 },
    )
    .await;
    // A request with a body: the copy carries it whole, and the upstream got it too.
    let payload = "x".repeat(100_000);
    let req = http::Request::builder()
        .method("POST")
        .uri(proxy.url("/shadowed/upload"))
        .header(http::header::HOST, "echo")
        .body(Full::new(Bytes::from(payload.clone())))
        .expect("request");
    let got = send(&h1_client(), req).await.expect("call");
    assert_eq!(upstream(&got), "echo-v1", "{got:?}");
    assert_eq!(
        got.echo()["body"].as_str(),
        Some(payload.as_str()),
        "the upstream's body"
    );
    eventually(
        "the mirrored POST",
        Duration::from_secs(10),
        || async move { s.seen().len() == 2 },
    )
    .await;
    let (method, path, body) = shadow.seen()[1].clone();
    assert_eq!(
        (method.as_str(), path.as_str()),
        ("POST", "/shadowed/upload")
    );
    assert!(
        body == payload.as_bytes(),
        "the copy's body: {} bytes",
        body.len()
    );

    // A backend the mesh does not have: 500, and the status says why.
    assert_eq!(
        call(&proxy, "GET", "echo", "/missing", &[]).await.status,
        500
    );
    let (code, out, err) = control.weftctl(&["get", "httproutes"]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("echo-canary") && out.contains("shop") && out.contains("echo:80"),
        "{out}"
    );
    assert!(out.contains("True (Accepted)"), "{out}");
    assert!(
        out.contains("False (BackendNotFound: no service named nowhere)"),
        "{out}"
    );
    let (_, yaml, _) = control.weftctl(&["get", "httproutes", "-o", "yaml"]);
    assert!(
        yaml.contains("apiVersion: gateway.networking.k8s.io/v1"),
        "{yaml}"
    );
    assert!(yaml.contains("reason: BackendNotFound"), "{yaml}");

    // GRPCRoute: the method decides.
    let grpc = [("content-type", "application/grpc")];
    let got = call(
        &proxy,
        "POST",
        "greeter",
        "/helloworld.Greeter/SayHello",
        &grpc,
    )
    .await;
    assert_eq!(upstream(&got), "echo-v2");
    let got = call(
        &proxy,
        "POST",
        "greeter",
        "/helloworld.Greeter/SayGoodbye",
        &grpc,
    )
    .await;
    assert_eq!(upstream(&got), "echo-v1");

    // Services no route names are untouched: routing by authority.
    assert_eq!(
        upstream(&call(&proxy, "GET", "other", "/", &[]).await),
        "other"
    );
    assert_eq!(call(&proxy, "GET", "nobody", "/", &[]).await.status, 404);

    // A canary shift is one apply: 50/50 now, with no restart.
    apply(
        &control,
        &ROUTES
            .replace("weight: 80", "weight: 50")
            .replace("weight: 20", "weight: 50"),
    );
    eventually("the new weights", Duration::from_secs(20), || async move {
        let mut v2 = 0;
        for _ in 0..20 {
            v2 += usize::from(
                call(p, "GET", "echo", "/", &[]).await.header("x-upstream") == "echo-v2",
            );
        }
        v2 == 10
    })
    .await;

    // What Weft does not support is refused by name; nothing is stored.
    let bad = [
        (
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: bad}\nspec:\n  parentRefs: [{name: my-gateway}]\n",
            "only Services",
        ),
        (
            "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: bad}\nspec:\n  parentRefs: [{kind: Service, name: echo}]\n  rules: [{sessionPersistence: {sessionName: s}}]\n",
            "unknown field `sessionPersistence`",
        ),
        (
            "apiVersion: gateway.networking.k8s.io/v1beta1\nkind: HTTPRoute\nmetadata: {name: bad}\nspec: {}\n",
            "is read as `gateway.networking.k8s.io/v1`",
        ),
    ];
    for (doc, want) in bad {
        let (code, out, err) = control.weftctl_stdin(&["apply", "-f", "-"], Some(doc));
        assert_ne!(code, 0, "{out}");
        assert!(err.contains(want), "{err}");
    }
    let (_, out, _) = control.weftctl(&["get", "httproutes"]);
    assert!(!out.contains("bad"), "{out}");
}
