//! The proxy-wasm compatibility suite: filters written only against the upstream
//! `proxy-wasm` crate (tests/filters/), built for wasm32-wasip1, run by the real proxy.

use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;
use weft_tests::*;

use crate::eps;

/// A config whose listener runs the `compat_basic` filter with `extra` filter fields.
fn filtered(ups: &[&Upstream], extra: &str) -> String {
    let filter = format!(
        "    filters:
      - name: basic
        module: \"{}\"
        root_id: my-root
        config: {{ greeting: hi }}
        vm_config: vm-cfg
{extra}",
        guest_filter("compat_basic").display()
    );
    crate::config(&filter, "", &eps(ups)).replace(
        "drain: { timeout_ms: 5000 }",
        &format!(
            "drain: {{ timeout_ms: 5000 }}\nwasm: {{ cache_dir: \"{}\" }}",
            shared_module_cache().display()
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upstream_sdk_filter_edits_headers_both_ways() {
    let up = Upstream::start("u").await;
    let proxy = ProxyProcess::start(&filtered(&[&up], "")).await;
    for client in [h1_client(), h2_client()] {
        let req = Request::get(proxy.url("/hello?x=1"))
            .header("x-replace-me", "original")
            .header("x-remove-me", "secret")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let got = send(&client, req).await.unwrap();
        assert_eq!(got.status, 200, "{got:?}");
        // Response side: a header added with the status read as a property, and a header
        // from the upstream removed.
        assert_eq!(got.header("x-wasm-response"), "seen 200");
        assert_eq!(
            got.header("x-wasm-upstream"),
            up.address(),
            "upstream.address"
        );
        assert_eq!(got.header("x-wasm-attempts"), "1", "request_attempt_count");
        assert_eq!(got.header("x-upstream"), "", "removed by the filter");
        assert_eq!(got.header("x-wasm-request-path"), "/hello?x=1");
        let echo = got.echo();
        let h = |name: &str| echo["headers"][name][0].as_str().unwrap_or("").to_owned();
        assert_eq!(h("x-wasm-config"), r#"{"greeting":"hi"}"#, "a map is JSON");
        assert_eq!(h("x-wasm-vm-config"), "vm-cfg", "a string is raw");
        assert_eq!(h("x-wasm-added"), "1");
        assert_eq!(h("x-replace-me"), "replaced");
        assert_eq!(h("x-remove-me"), "");
        let props = h("x-wasm-properties");
        assert!(
            props.starts_with(
                "path=/hello?x=1 method=GET plugin=basic root_id=my-root source=127.0.0.1:"
            ),
            "{props}"
        );
        // The map the filter saw had the pseudo-headers and the request's headers.
        let count: usize = h("x-wasm-header-count").parse().unwrap();
        assert!(count >= 6, "{count}");
        // As in Envoy: the authority once, as `:authority` (no `host` beside it on HTTP/1.1),
        // and the headers the proxy adds before the chain already there.
        let names = h("x-wasm-map");
        let names: Vec<&str> = names.split(',').collect();
        assert_eq!(
            names.iter().filter(|n| **n == ":authority").count(),
            1,
            "{names:?}"
        );
        assert!(!names.contains(&"host"), "{names:?}");
        for added in ["x-request-id", "x-forwarded-proto", "x-forwarded-for"] {
            assert!(names.contains(&added), "{added} not visible: {names:?}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filter_metrics_and_ticks_reach_prometheus() {
    let up = Upstream::start("u").await;
    let proxy = ProxyProcess::start(&filtered(&[&up], "")).await;
    let client = h1_client();
    for _ in 0..7 {
        assert_eq!(get(&client, &proxy.url("/")).await.unwrap().status, 200);
    }
    assert_eq!(
        get(&client, &proxy.url("/status/404"))
            .await
            .unwrap()
            .status,
        404
    );
    let stats = proxy.stats().await;
    // Both workers' instances add to one counter.
    assert!(
        stats.contains("weft_filter_basic_requests_total 8"),
        "{stats}"
    );
    assert!(
        stats.contains("# TYPE weft_filter_basic_request_headers histogram"),
        "{stats}"
    );
    assert!(
        stats.contains("weft_filter_basic_request_headers_count 8"),
        "{stats}"
    );
    assert!(
        stats.contains("weft_filter_basic_last_status 404"),
        "{stats}"
    );
    // 50 ms ticks on each of 2 workers.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ticks =
        metric_value(&proxy.stats().await, "weft_filter_basic_ticks_total").expect("ticks counter");
    assert!(ticks >= 10.0, "{ticks} ticks");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shared_queue_items_reach_the_owner_through_on_queue_ready() {
    let up = Upstream::start("u").await;
    let proxy = ProxyProcess::start(&filtered(&[&up], "")).await;
    let client = h1_client();
    for _ in 0..6 {
        // Requests land on both workers; the queue has one owner, which drains it all.
        assert_eq!(
            get(&h1_client(), &proxy.url("/enqueue"))
                .await
                .unwrap()
                .status,
            200
        );
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stats = proxy.stats().await;
        if stats.contains("weft_filter_basic_dequeued_total 6") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not all items dequeued:\n{stats}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(get(&client, &proxy.url("/")).await.unwrap().status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_can_answer_locally() {
    let up = Upstream::start("u").await;
    let proxy = ProxyProcess::start(&filtered(&[&up], "")).await;
    let got = get(&h1_client(), &proxy.url("/deny")).await.unwrap();
    assert_eq!(got.status, 403);
    assert_eq!(got.header("x-denied-by"), "wasm");
    assert_eq!(got.body, "denied by filter\n");
    // As in Envoy, the filter's response callback ran on its own local reply.
    assert_eq!(got.header("x-wasm-response"), "seen 403");
    assert_eq!(up.hits(), 0);
    let stats = proxy.stats().await;
    assert!(stats.contains(
        "weft_requests_total{listener=\"ingress\",cluster=\"svc\",status_class=\"4xx\"} 1"
    ));
    // on_log saw the local reply's status and the request's path.
    assert!(
        stats.contains("weft_filter_basic_logged_403_total 1"),
        "{stats}"
    );
    assert!(
        stats.contains("weft_filter_basic_logged_deny_path_total 1"),
        "{stats}"
    );
    // `response.code_details`: the details the filter gave its reply, or `via_upstream`.
    let got = get(&h1_client(), &proxy.url("/deny/details"))
        .await
        .unwrap();
    assert_eq!(got.status, 403);
    assert_eq!(got.header("x-wasm-details"), "[denied_by_basic]");
    let got = get(&h1_client(), &proxy.url("/")).await.unwrap();
    assert_eq!(got.header("x-wasm-details"), "[via_upstream]");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn local_replies_are_framed_by_the_proxy_and_an_invalid_status_says_so() {
    let up = Upstream::start("u").await;
    let proxy = ProxyProcess::start(&filtered(&[&up], "")).await;
    for client in [h1_client(), h2_client()] {
        // The filter's own content-length (999) is replaced by the body's: no client waits
        // for bytes that never come, no HTTP/2 protocol error.
        let got = tokio::time::timeout(
            Duration::from_secs(5),
            get(&client, &proxy.url("/deny/bad-length")),
        )
        .await
        .expect("answered in time")
        .unwrap();
        assert_eq!(got.status, 403, "{got:?}");
        assert_eq!(got.body, "short\n");
        assert_eq!(got.header("content-length"), "6");
        // The connection stays usable.
        assert_eq!(get(&client, &proxy.url("/")).await.unwrap().status, 200);

        let got = get(&client, &proxy.url("/deny/bad-status")).await.unwrap();
        assert_eq!(got.status, 500);
        assert_eq!(
            got.body,
            "filter `basic` sent a local reply with invalid status 1000\n"
        );
    }
    assert!(proxy.log().contains("invalid status 1000"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn envoy_properties_filters_read_in_practice() {
    let mut up = Upstream::start("u").await;
    let args: Vec<String> = ["--id", "edge-1", "--label", "app=shop"]
        .map(String::from)
        .to_vec();
    let proxy = ProxyProcess::start_args_any(&filtered(&[&up], ""), 2, &args).await;
    let req = Request::get(proxy.url("/p?a=1&b=2"))
        .header("referer", "https://shop.example/cart")
        .header("user-agent", "weft-test/1")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let got = send(&h1_client(), req).await.unwrap();
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(
        got.echo()["headers"]["x-wasm-envoy"][0],
        "q=a=1&b=2 ref=https://shop.example/cart ua=weft-test/1 node=edge-1 app=shop dir=0"
    );
    // The node's metadata and the node as Envoy hands messages over: protobuf bytes a
    // protobuf library decodes (google.protobuf.Struct; envoy.config.core.v3.Node's id is
    // field 1, its metadata field 3).
    use prost::Message as _;
    let unhex = |s: &str| -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    };
    let md = unhex(
        got.echo()["headers"]["x-wasm-node-metadata"][0]
            .as_str()
            .unwrap(),
    );
    let md = prost_types::Struct::decode(md.as_slice()).unwrap();
    assert_eq!(
        md.fields["app"].kind,
        Some(prost_types::value::Kind::StringValue("shop".into()))
    );
    #[derive(Clone, PartialEq, prost::Message)]
    struct Node {
        #[prost(string, tag = "1")]
        id: String,
        #[prost(message, optional, tag = "3")]
        metadata: Option<prost_types::Struct>,
    }
    let node = unhex(got.echo()["headers"]["x-wasm-node"][0].as_str().unwrap());
    let node = Node::decode(node.as_slice()).unwrap();
    assert_eq!(node.id, "edge-1");
    assert_eq!(node.metadata, Some(md));
    // Known in the request phase already (the listener's default cluster), and what one
    // filter sets read back as filter state and dynamic metadata.
    let host = proxy
        .url("/")
        .replace("http://", "")
        .trim_end_matches('/')
        .to_owned();
    assert_eq!(
        got.echo()["headers"]["x-wasm-envoy-more"][0],
        format!(
            "cluster=svc url_path=/p host={host} scheme=http mtls=[0] sni=[] fs=alice md=alice"
        )
    );
    assert_eq!(got.header("x-wasm-flags"), "0", "via upstream: no flags");
    assert_eq!(got.header("x-wasm-cluster"), "svc");
    // The proxy's own answer carries Envoy's flag for why (connection failure: 0x20).
    up.kill();
    let got = get(&h1_client(), &proxy.url("/p")).await.unwrap();
    assert_eq!(got.status, 503, "{got:?}");
    assert_eq!(got.header("x-wasm-flags"), "32");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_of_the_previous_abi_generation_runs() {
    let up = Upstream::start("u").await;
    let yaml = crate::chain(
        "svc",
        &[crate::filter(
            "legacy",
            &guest_filter("compat_legacy"),
            "\"from-0.1\"",
        )],
        &[crate::cluster("svc", &[up.address()], "")],
    );
    let proxy = ProxyProcess::start(&yaml).await;
    for client in [h1_client(), h2_client()] {
        let got = get(&client, &proxy.url("/x")).await.unwrap();
        assert_eq!(got.status, 200, "{got:?}");
        // proxy_get_configuration and the two-argument headers callback of ABI 0.1.0.
        assert_eq!(got.echo()["headers"]["x-legacy"][0], "from-0.1");
        let got = get(&client, &proxy.url("/legacy-deny")).await.unwrap();
        assert_eq!(got.status, 403);
        assert_eq!(got.body, "denied by a 0.1 filter\n");
    }
    assert_eq!(up.hits(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_that_cannot_take_effect_gets_envoys_status_and_one_warning() {
    let up = Upstream::start("u").await;
    let proxy = ProxyProcess::start_with(&filtered(&[&up], ""), 1).await;
    for _ in 0..3 {
        let got = get(&h1_client(), &proxy.url("/wrong-phase")).await.unwrap();
        assert_eq!(got.status, 200, "{got:?}");
        // BAD_ARGUMENT (2), not OK with nothing done.
        assert_eq!(got.echo()["headers"]["x-wrong-phase-status"][0], "2");
        assert_eq!(got.header("x-early"), "", "nothing was added");
    }
    assert_eq!(
        proxy
            .log()
            .matches("where that map cannot be written")
            .count(),
        1,
        "{}",
        proxy.log()
    );
}

/// Waits (5 s at most) until `/stats/prometheus` shows `series`.
async fn until_stat(proxy: &ProxyProcess, series: &str) {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stats = proxy.stats().await;
        if stats.contains(series) {
            return;
        }
        assert!(Instant::now() < deadline, "no `{series}`:\n{stats}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chain_swapped_in_takes_over_its_shared_queues() {
    let up = Upstream::start("u").await;
    let yaml = filtered(&[&up], "");
    let proxy = ProxyProcess::start_with(&yaml, 1).await;
    let enqueue = || async {
        get(&h1_client(), &proxy.url("/enqueue"))
            .await
            .unwrap()
            .status
    };
    assert_eq!(enqueue().await, 200);
    until_stat(&proxy, "weft_filter_basic_dequeued_total 1").await;
    // SIGHUP rebuilds the chain: the new instance registers the queue again and must get
    // its items (the old owner is retired).
    proxy.reload(&yaml);
    let deadline = Instant::now() + Duration::from_secs(10);
    while !proxy.log().contains("SIGHUP: config applied") {
        assert!(Instant::now() < deadline, "{}", proxy.log());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(enqueue().await, 200);
    until_stat(&proxy, "weft_filter_basic_dequeued_total 2").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_failing_in_on_queue_ready_is_counted() {
    let up = Upstream::start("u").await;
    let proxy = ProxyProcess::start_with(&filtered(&[&up], ""), 1).await;
    // The owner (this worker's instance) traps on the item, outside any stream: counted like
    // any failure, and the instance is failed (fail_closed), so the request itself may
    // already get 503 on its way back.
    let got = get(&h1_client(), &proxy.url("/enqueue/poison"))
        .await
        .unwrap();
    assert!(matches!(got.status, 200 | 503), "{got:?}");
    until_stat(
        &proxy,
        r#"weft_filter_failures_total{filter="basic",kind="trap"} 1"#,
    )
    .await;
}

/// Sends `path` and returns (status, whether the filter's request edits were applied).
async fn call(proxy: &ProxyProcess, path: &str) -> (u16, bool) {
    let got = get(&h1_client(), &proxy.url(path)).await.unwrap();
    let filtered = got.status == 200 && got.echo()["headers"]["x-wasm-added"][0] == "1";
    (got.status, filtered)
}

fn failures(stats: &str, kind: &str) -> f64 {
    let key = format!("weft_filter_failures_total{{filter=\"basic\",kind=\"{kind}\"}}");
    metric_value(stats, &key).unwrap_or_else(|| panic!("no {key} in\n{stats}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failure_policies_decide_what_the_stream_gets() {
    let up = Upstream::start("u").await;
    // One worker, so "later streams" run on the instance that failed.
    let closed = ProxyProcess::start_with(
        &filtered(&[&up], "        failure_policy: fail_closed\n"),
        1,
    )
    .await;
    assert_eq!(call(&closed, "/").await, (200, true));
    let got = get(&h1_client(), &closed.url("/panic")).await.unwrap();
    assert_eq!(got.status, 503);
    assert_eq!(got.header("x-weft-filter-failed"), "basic");
    assert_eq!(call(&closed, "/").await.0, 503, "the instance stays failed");
    assert_eq!(failures(&closed.stats().await, "trap"), 1.0);
    assert!(
        closed.log().contains("the filter panicked on purpose"),
        "the guest's panic message is logged"
    );

    let open =
        ProxyProcess::start_with(&filtered(&[&up], "        failure_policy: fail_open\n"), 1).await;
    assert_eq!(
        call(&open, "/panic").await,
        (200, false),
        "skipped, stream goes on"
    );
    assert_eq!(
        call(&open, "/").await,
        (200, false),
        "later streams skip it too"
    );

    let reload =
        ProxyProcess::start_with(&filtered(&[&up], "        failure_policy: reload\n"), 1).await;
    assert_eq!(call(&reload, "/panic").await.0, 503);
    assert_eq!(
        call(&reload, "/").await,
        (200, true),
        "a fresh instance runs the filter"
    );
}

/// The callback deadline counts time a filter ran, not time the machine took its thread
/// away: on a saturated machine (six spinning threads on this one's cores, for at most a few
/// seconds) filters within their 10 ms are never failed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_saturated_machine_does_not_fail_filters_on_their_deadline() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    let up = Upstream::start("u").await;
    let cfg = filtered(&[&up], "        limits: { callback_ms: 10 }\n");
    let proxy = ProxyProcess::start_with(&cfg, 2).await;
    let stop = Arc::new(AtomicBool::new(false));
    let spinners: Vec<_> = (0..6)
        .map(|_| {
            let stop = stop.clone();
            std::thread::spawn(move || {
                let until = Instant::now() + Duration::from_secs(4);
                while !stop.load(Ordering::Relaxed) && Instant::now() < until {
                    std::hint::spin_loop();
                }
            })
        })
        .collect();
    // 16 clients at once, for 3 s.
    let proxy = Arc::new(proxy);
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let proxy = proxy.clone();
            tokio::spawn(async move {
                let mut statuses = std::collections::BTreeMap::new();
                let started = Instant::now();
                while started.elapsed() < Duration::from_secs(3) {
                    let (status, filtered) = call(&proxy, "/").await;
                    *statuses.entry((status, filtered)).or_insert(0u32) += 1;
                }
                statuses
            })
        })
        .collect();
    let mut statuses = std::collections::BTreeMap::new();
    for c in clients {
        for (k, n) in c.await.expect("client") {
            *statuses.entry(k).or_insert(0) += n;
        }
    }
    stop.store(true, Ordering::Relaxed);
    for s in spinners {
        let _ = s.join();
    }
    assert_eq!(statuses.len(), 1, "{statuses:?}");
    assert!(statuses.contains_key(&(200, true)), "{statuses:?}");
    assert_eq!(failures(&proxy.stats().await, "deadline"), 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runaway_filters_are_stopped_by_their_limits() {
    let up = Upstream::start("u").await;
    let cfg = filtered(
        &[&up],
        "        failure_policy: reload\n        limits: { memory_mb: 16, callback_ms: 50 }\n",
    );
    let proxy = ProxyProcess::start_with(&cfg, 1).await;

    let started = Instant::now();
    assert_eq!(call(&proxy, "/loop").await.0, 503);
    let took = started.elapsed();
    assert!(
        took < Duration::from_secs(2),
        "infinite loop interrupted: {took:?}"
    );
    assert_eq!(failures(&proxy.stats().await, "deadline"), 1.0);

    // Growing memory is checked on its own proxy with a generous deadline: filling 16 MiB
    // on a loaded machine may take longer than the 50 ms above, which would make it a
    // deadline failure instead.
    let cfg = filtered(
        &[&up],
        "        failure_policy: reload\n        limits: { memory_mb: 16, callback_ms: 10000 }\n",
    );
    let grow = ProxyProcess::start_with(&cfg, 1).await;
    assert_eq!(call(&grow, "/grow").await.0, 503);
    assert_eq!(failures(&grow.stats().await, "memory"), 1.0);
    assert_eq!(failures(&grow.stats().await, "deadline"), 0.0);

    // Throughout, other requests are served (by fresh instances).
    for _ in 0..5 {
        assert_eq!(call(&proxy, "/").await, (200, true));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_modules_are_startup_errors_naming_the_file() {
    let dir = tempfile::tempdir().unwrap();
    let garbage = dir.path().join("garbage.wasm");
    std::fs::write(&garbage, b"this is not wasm at all").unwrap();
    let no_abi = dir.path().join("no_abi.wasm");
    // The smallest valid module: magic and version, no exports.
    std::fs::write(&no_abi, b"\0asm\x01\0\0\0").unwrap();
    let missing = dir.path().join("missing.wasm");
    let basic = guest_filter("compat_basic");

    let cases = [
        (
            garbage.display().to_string(),
            "{}",
            "not a valid WebAssembly module",
        ),
        (
            no_abi.display().to_string(),
            "{}",
            "does not export a proxy-wasm ABI version",
        ),
        (missing.display().to_string(), "{}", "cannot read"),
        (
            basic.display().to_string(),
            "refuse",
            "proxy_on_configure returned false (the filter logged: \"configured with refuse\")",
        ),
    ];
    for (module, config, expected) in cases {
        let yaml = format!(
            "admin: {{ address: \"127.0.0.1:{}\" }}
wasm: {{ cache_dir: \"{}\" }}
listeners:
  - name: ingress
    address: \"127.0.0.1:{}\"
    default_cluster: svc
    filters:
      - {{ name: f, module: \"{module}\", config: \"{config}\" }}
clusters:
  - {{ name: svc, endpoints: [ {{ address: \"127.0.0.1:1\" }} ] }}
",
            free_port(),
            shared_module_cache().display(),
            free_port()
        );
        let (status, err) = run_proxy_expecting_failure(&yaml, "proxy.yaml");
        assert_eq!(status.code(), Some(2), "{err}");
        assert!(
            err.contains(&format!("listener `ingress`: filter `f` ({module})")),
            "{err}"
        );
        assert!(err.contains(expected), "{expected:?} in {err}");
    }
    tokio::time::sleep(Duration::ZERO).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_with_a_warm_cache_does_not_recompile() {
    let up = Upstream::start("u").await;
    let cache = tempfile::tempdir().unwrap();
    let cfg = filtered(&[&up], "").replace(
        &shared_module_cache().display().to_string(),
        &cache.path().display().to_string(),
    );
    let entries = |dir: &std::path::Path| std::fs::read_dir(dir).map_or(0, |d| d.count());
    assert_eq!(entries(cache.path()), 0, "the cache starts empty");
    // The first start compiles and fills the cache. (Its log may be a second attempt's,
    // which already loads from the cache: `start` starts again on other ports when one was
    // taken between the probe and the bind.)
    let first = ProxyProcess::start(&cfg).await;
    assert!(entries(cache.path()) > 0, "{}", first.log());
    drop(first);
    let second = ProxyProcess::start(&cfg).await;
    assert!(
        second.log().contains("loaded compiled module from cache"),
        "{}",
        second.log()
    );
    assert!(
        !second.log().contains("compiled module in"),
        "{}",
        second.log()
    );
    assert_eq!(call(&second, "/").await, (200, true));
}

/// A listener running `compat_callout` (configuration `config`) in front of `svc`, with
/// cluster `auth` (extra fields `auth_extra`).
fn authz_yaml(svc: &Upstream, auth: &Upstream, config: &str, auth_extra: &str) -> String {
    crate::chain(
        "svc",
        &[crate::filter(
            "authz",
            &guest_filter("compat_callout"),
            config,
        )],
        &[
            crate::cluster("svc", &[svc.address()], ""),
            crate::cluster("auth", &[auth.address()], auth_extra),
        ],
    )
}

/// A proxy whose listener runs `compat_callout` asking cluster `auth` before `svc`.
async fn authz_proxy(svc: &Upstream, auth: &Upstream) -> ProxyProcess {
    ProxyProcess::start(&authz_yaml(svc, auth, "auth", "")).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callout_the_stream_does_not_wait_for_is_still_sent_and_answered() {
    let svc = Upstream::start("svc").await;
    let auth = Upstream::start("auth").await;
    let proxy = authz_proxy(&svc, &auth).await;
    // The request goes on at once (the upstream takes 400 ms); the callout goes out beside
    // it and its answer reaches the stream's context while the stream lives (it used to be
    // dropped while the call said OK).
    let got = get(&h1_client(), &proxy.url("/delay/400/notify"))
        .await
        .unwrap();
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(auth.hits(), 1);
    until_stat(&proxy, "weft_filter_notify_answered_204_total 1").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callouts_sent_at_once_run_side_by_side() {
    let svc = Upstream::start("svc").await;
    let auth = Upstream::start_slow("auth", Duration::from_millis(500)).await;
    let proxy = authz_proxy(&svc, &auth).await;
    let req = Request::get(proxy.url("/orders"))
        .header("x-auth-parallel", "3")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let t0 = Instant::now();
    let got = send(&h1_client(), req).await.unwrap();
    let took = t0.elapsed();
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(auth.hits(), 3, "all three callouts were sent");
    // Three 500 ms answers one after another would take 1.5 s; side by side about 0.5 s.
    assert!(took < Duration::from_millis(1300), "{took:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callout_with_timeout_zero_gets_the_host_default() {
    let svc = Upstream::start("svc").await;
    let auth = Upstream::start_slow("auth", Duration::from_millis(300)).await;
    let proxy = authz_proxy(&svc, &auth).await;
    let client = h1_client();
    let call = |timeout_ms: &'static str| {
        let req = Request::get(proxy.url("/orders"))
            .header("x-auth-timeout-ms", timeout_ms)
            .body(Full::new(Bytes::new()))
            .unwrap();
        send(&client, req)
    };
    // 0 is "the host's default" (15 s), not 1 ms: the slow answer arrives in time.
    let got = call("0").await.unwrap();
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(got.echo()["headers"]["x-auth"][0], "ok");
    // A real timeout still bounds the callout.
    let got = call("50").await.unwrap();
    assert_eq!(got.status, 403, "{got:?}");
    assert_eq!(got.header("x-auth-status"), "none");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http_callout_allows_or_denies_the_request() {
    let svc = Upstream::start("svc").await;
    let mut auth = Upstream::start("auth").await;
    let yaml = format!(
        "admin: {{ address: \"{{admin}}\" }}
wasm: {{ cache_dir: \"{cache}\" }}
listeners:
  - name: ingress
    address: \"{{listen}}\"
    default_cluster: svc
    filters:
      - {{ name: authz, module: \"{module}\", config: auth }}
clusters:
  - {{ name: svc, endpoints: [ {{ address: \"{svc}\" }} ] }}
  - name: auth
    connect_timeout_ms: 300
    outlier: {{ consecutive_failures: 0 }}
    endpoints: [ {{ address: \"{auth}\" }} ]
",
        cache = shared_module_cache().display(),
        module = guest_filter("compat_callout").display(),
        svc = svc.address(),
        auth = auth.address(),
    );
    let proxy = ProxyProcess::start(&yaml).await;
    for client in [h1_client(), h2_client()] {
        // Allowed: the filter's edits made while paused reach the upstream.
        let got = get(&client, &proxy.url("/orders")).await.unwrap();
        assert_eq!(got.status, 200, "{got:?}");
        let echo = got.echo();
        assert_eq!(echo["headers"]["x-auth"][0], "ok");
        assert_eq!(
            echo["headers"]["x-auth-body"][0], "status 200",
            "callout body read"
        );

        // Denied: a local 403, nothing reaches the service.
        let before = svc.hits();
        let req = Request::get(proxy.url("/orders"))
            .header("x-auth-status", "403")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let got = send(&client, req).await.unwrap();
        assert_eq!(got.status, 403);
        assert_eq!(got.header("x-auth-status"), "403");
        assert_eq!(got.body, "denied by auth\n");
        assert_eq!(svc.hits(), before);
    }
    assert_eq!(auth.hits(), 4);

    // No callout for /public.
    assert_eq!(
        get(&h1_client(), &proxy.url("/public"))
            .await
            .unwrap()
            .status,
        200
    );
    assert_eq!(auth.hits(), 4);

    // A callout from the response headers: the response waits for it and carries its
    // answer, for both client protocols.
    for client in [h1_client(), h2_client()] {
        let got = get(&client, &proxy.url("/public/audited")).await.unwrap();
        assert_eq!(got.status, 200, "{got:?}");
        assert_eq!(got.header("x-audit"), "202");
        assert_eq!(
            got.echo()["uri"],
            "/public/audited",
            "the upstream's body follows"
        );
    }
    assert_eq!(auth.hits(), 6);

    // The auth service is down: the filter gets no answer and denies.
    auth.kill();
    let got = get(&h1_client(), &proxy.url("/orders")).await.unwrap();
    assert_eq!(got.status, 403, "{got:?}");
    assert_eq!(got.header("x-auth-status"), "none");
    // The proxy keeps serving what needs no callout.
    assert_eq!(
        get(&h1_client(), &proxy.url("/public"))
            .await
            .unwrap()
            .status,
        200
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_runs_once_per_proxy_with_no_traffic() {
    let up = Upstream::start("u").await;
    let yaml = crate::config("", "", &eps(&[&up])).replace(
        "drain: { timeout_ms: 5000 }",
        &format!(
            "drain: {{ timeout_ms: 5000 }}
wasm:
  cache_dir: \"{}\"
  services:
    - {{ name: ticker, module: \"{}\", config: service }}",
            shared_module_cache().display(),
            guest_filter("compat_basic").display()
        ),
    );
    // Two workers, but one instance of the service (plus the canary that proved it starts).
    let proxy = ProxyProcess::start_with(&yaml, 2).await;
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let ticks = metric_value(&proxy.stats().await, "weft_filter_basic_ticks_total");
        if ticks.is_some_and(|t| t > 0.0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the service never ticked:\n{}",
            proxy.log()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(
        proxy.log().matches("configured with service").count(),
        2,
        "{}",
        proxy.log()
    );
    // The listener itself has no filter: requests pass untouched.
    let got = get(&h1_client(), &proxy.url("/")).await.unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(
        got.echo()["headers"]["x-wasm-added"],
        serde_json::Value::Null
    );
}

/// Five `compat_basic` filters: `a` and `b` with `vm_id: shared`; `c`, `d` and `e` with none,
/// `e` with a `vm_config` of its own.
fn sharing(up: &Upstream, b_extra: &str) -> String {
    let module = guest_filter("compat_basic");
    let f = |name: &str, extra: &str| {
        format!(
            "{{ name: {name}, module: \"{}\", config: cfg-{name}{extra} }}",
            module.display()
        )
    };
    crate::chain(
        "svc",
        &[
            f("a", ", vm_id: shared"),
            f("b", &format!(", vm_id: shared{b_extra}")),
            f("c", ""),
            f("d", ""),
            f("e", ", vm_config: own"),
        ],
        &[crate::cluster("svc", &[up.address()], "")],
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_with_the_same_vm_id_share_one_instance_with_their_own_configs() {
    let up = Upstream::start("u").await;
    let proxy = ProxyProcess::start_with(&sharing(&up, ""), 1).await;
    let got = get(&h1_client(), &proxy.url("/")).await.unwrap();
    assert_eq!(got.status, 200, "{got:?}");
    let h = &got.echo()["headers"];
    // `a` and `b` run in one instance (two root contexts there), each with its own
    // configuration and the shared VM id. Without a vm_id, filters of one module and
    // vm_config share too, as Envoy's default does (`c` and `d`, with the empty VM id), but
    // `e`, configured apart, has an instance of its own.
    assert_eq!(h["x-wasm-vm-a"][0], "roots=2 vm=shared config=cfg-a");
    assert_eq!(h["x-wasm-vm-b"][0], "roots=2 vm=shared config=cfg-b");
    assert_eq!(h["x-wasm-vm-c"][0], "roots=2 vm= config=cfg-c");
    assert_eq!(h["x-wasm-vm-d"][0], "roots=2 vm= config=cfg-d");
    assert_eq!(h["x-wasm-vm-e"][0], "roots=1 vm= config=cfg-e");
    // `b` traps: that takes the shared instance down, so the next request fails closed in
    // `a` (as a VM failure does in Envoy), while `c` is untouched.
    let got = get(&h1_client(), &proxy.url("/panic/cfg-b")).await.unwrap();
    assert_eq!((got.status, got.header("x-weft-filter-failed")), (503, "b"));
    let got = get(&h1_client(), &proxy.url("/")).await.unwrap();
    assert_eq!((got.status, got.header("x-weft-filter-failed")), (503, "a"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn filters_that_share_a_vm_id_must_share_their_module() {
    let up = Upstream::start("u").await;
    let yaml = render(
        &sharing(&up, ", vm_config: other"),
        free_port(),
        free_port(),
    );
    let (status, log) = run_proxy_expecting_failure(&yaml, "sharing.yaml");
    assert_eq!(status.code(), Some(2), "{log}");
    assert!(
        log.contains("shares vm_id `shared` with filter `a` but not its module and vm_config"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_host_name_endpoint_reads_as_the_address_its_connection_reached() {
    let up = Upstream::start("u").await;
    let host = format!("localhost:{}", up.addr.port());
    let yaml = crate::chain(
        "svc",
        &[crate::filter("basic", &guest_filter("compat_basic"), "")],
        &[crate::cluster("svc", &[host], "")],
    );
    let proxy = ProxyProcess::start(&yaml).await;
    for _ in 0..2 {
        let got = get(&h1_client(), &proxy.url("/")).await.unwrap();
        assert_eq!(got.status, 200, "{got:?}");
        // `upstream.address` is the socket address reached, as Envoy reports its hosts'.
        assert_eq!(got.header("x-wasm-upstream"), up.address(), "{got:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_local_reply_to_a_grpc_request_is_a_grpc_status() {
    let up = Upstream::start("u").await;
    let proxy = ProxyProcess::start(&filtered(&[&up], "")).await;
    // As Envoy answers gRPC clients: HTTP 200, trailers-only, the status mapped from the
    // HTTP one (403: PERMISSION_DENIED) or the filter's own, the body as grpc-message.
    for (path, status, message) in [
        ("/deny", "7", "denied by filter%0A"),
        ("/deny/grpc-status", "16", "no%0A"),
    ] {
        let req = Request::post(proxy.url(path))
            .header("content-type", "application/grpc")
            .header("te", "trailers")
            .body(Full::new(Bytes::new()))
            .unwrap();
        let got = send(&h2_client(), req).await.unwrap();
        assert_eq!(got.status, 200, "{got:?}");
        assert_eq!(got.header("grpc-status"), status, "{got:?}");
        assert_eq!(got.header("grpc-message"), message, "{got:?}");
        assert_eq!(got.header("content-type"), "application/grpc");
        assert_eq!(got.body, "");
    }
    assert_eq!(up.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callouts_from_on_configure_a_callout_answer_and_on_queue_ready_are_answered_on_the_root() {
    let svc = Upstream::start("svc").await;
    let auth = Upstream::start("auth").await;
    let yaml = authz_yaml(&svc, &auth, "\"auth:warm\"", "");
    // One worker: one instance, so one of each callout.
    let proxy = ProxyProcess::start_with(&yaml, 1).await;
    // From on_configure (201), then from its answer's callback (202), with no traffic.
    until_stat(&proxy, "weft_filter_root_answered_1_201_total 1").await;
    until_stat(&proxy, "weft_filter_root_answered_2_202_total 1").await;
    // From on_queue_ready (203), for an item a request queued.
    let got = get(&h1_client(), &proxy.url("/enqueue")).await.unwrap();
    assert_eq!(got.status, 200, "{got:?}");
    until_stat(&proxy, "weft_filter_root_answered_3_203_total 1").await;
    assert_eq!(auth.hits(), 3);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callouts_trailers_are_sent() {
    let svc = Upstream::start("svc").await;
    let auth = Upstream::start("auth").await;
    let proxy = ProxyProcess::start(&authz_yaml(&svc, &auth, "auth", "protocol: http2")).await;
    let req = Request::get(proxy.url("/orders"))
        .header("x-auth-echo", "t1")
        .body(Full::new(Bytes::new()))
        .unwrap();
    let got = send(&h1_client(), req).await.unwrap();
    assert_eq!(got.status, 200, "{got:?}");
    // The auth service saw the callout's body and trailer (its echo came back as
    // `x-auth-body`).
    let seen: serde_json::Value =
        serde_json::from_str(got.echo()["headers"]["x-auth-body"][0].as_str().unwrap()).unwrap();
    assert_eq!(seen["body"], "ping", "{seen}");
    assert_eq!(seen["trailers"]["x-callout-trailer"], "t1", "{seen}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn listener_direction_is_the_listeners_as_envoy_numbers_it() {
    let up = Upstream::start("u").await;
    for (direction, number) in [("inbound", "1"), ("outbound", "2")] {
        let yaml = filtered(&[&up], "").replace(
            "    default_cluster: svc\n",
            &format!("    default_cluster: svc\n    direction: {direction}\n"),
        );
        assert!(yaml.contains("direction:"), "{yaml}");
        let proxy = ProxyProcess::start(&yaml).await;
        let got = get(&h1_client(), &proxy.url("/")).await.unwrap();
        let envoy = got.echo()["headers"]["x-wasm-envoy"][0]
            .as_str()
            .unwrap()
            .to_owned();
        assert!(envoy.ends_with(&format!("dir={number}")), "{envoy}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_closing_the_stream_resets_it_instead_of_answering() {
    let up = Upstream::start("u").await;
    let proxy = ProxyProcess::start(&filtered(&[&up], "")).await;
    let (h1, h2) = (h1_client(), h2_client());
    // HTTP/1.1 has no way to reset one stream: the connection closes without a response.
    // HTTP/2 resets the stream (RST_STREAM).
    for (client, version, reset) in [
        (&h1, "HTTP/1.1", "IncompleteMessage"),
        (&h2, "HTTP/2", "INTERNAL_ERROR, Remote"),
    ] {
        // From the request headers: nothing goes upstream and no response comes back.
        let hits = up.hits.load(Ordering::SeqCst);
        let err = get(client, &proxy.url("/reset")).await.unwrap_err();
        assert!(err.contains(reset), "{version}: {err}");
        assert_eq!(up.hits.load(Ordering::SeqCst), hits, "{version}");
        // From the response headers: the request went upstream, its response is not sent.
        let err = get(client, &proxy.url("/reset/response"))
            .await
            .unwrap_err();
        assert!(err.contains(reset), "{version}: {err}");
        assert_eq!(up.hits.load(Ordering::SeqCst), hits + 1, "{version}");
        // The client goes on (HTTP/2 on the same connection: only the stream was reset).
        assert_eq!(get(client, &proxy.url("/")).await.unwrap().status, 200);
    }
    // Each reset stream still ended with `on_log`: with no response code when reset in the
    // request phase, with the upstream's when reset on its response headers.
    let stats = proxy.stats().await;
    assert_eq!(
        metric_value(&stats, "weft_filter_basic_logged_0_total"),
        Some(2.0),
        "{stats}"
    );
    assert_eq!(
        metric_value(&stats, "weft_filter_basic_logged_200_total"),
        Some(4.0),
        "{stats}"
    );
}
