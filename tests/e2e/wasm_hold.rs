//! Pause means paused: a request a filter pauses with nothing outstanding stays held until
//! the filter takes it up again from another context (here its root context's `on_tick`,
//! through `set_effective_context`): resumed, answered, failed with the filter, or ended at
//! the request timeout — and never reaches the upstream before that. (An authentication
//! filter waiting for its discovery document used to let such requests through.)

use std::time::{Duration, Instant};

use weft_tests::*;

use crate::{chain, cluster, filter};

/// A proxy whose listener runs `compat_hold` with `config`, in front of `up`.
async fn held_proxy(up: &Upstream, config: &str, cluster_extra: &str) -> ProxyProcess {
    let yaml = chain(
        "svc",
        &[filter("hold", &guest_filter("compat_hold"), config)],
        &[cluster("svc", &[up.address()], cluster_extra)],
    );
    ProxyProcess::start(&yaml).await
}

/// Sends `n` GETs at once; returns each response with how long it took.
async fn concurrent(proxy: &ProxyProcess, n: usize) -> Vec<(Got, Duration)> {
    let mut tasks = Vec::new();
    for _ in 0..n {
        let url = proxy.url("/orders");
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let got = get(&h1_client(), &url).await.unwrap();
            (got, t0.elapsed())
        }));
    }
    let mut out = Vec::new();
    for t in tasks {
        out.push(t.await.unwrap());
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn held_requests_wait_for_the_filter_and_then_go_on() {
    let up = Upstream::start("svc").await;
    let proxy = held_proxy(&up, "\"allow:700\"", "").await;
    let watcher = async {
        // While the filter is not ready, nothing reaches the upstream.
        tokio::time::sleep(Duration::from_millis(400)).await;
        up.hits()
    };
    let (got, hits_while_held) = tokio::join!(concurrent(&proxy, 6), watcher);
    assert_eq!(hits_while_held, 0, "a held request reached the upstream");
    for (g, took) in &got {
        assert_eq!(g.status, 200, "{g:?}");
        assert_eq!(g.echo()["headers"]["x-held"][0], "yes");
        assert!(*took >= Duration::from_millis(300), "not held: {took:?}");
    }
    assert_eq!(up.hits(), 6);
    // Once ready, requests go straight on.
    let got = get(&h1_client(), &proxy.url("/orders")).await.unwrap();
    assert_eq!(got.status, 200);
    assert_eq!(got.echo()["headers"]["x-held"][0], "no");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_answers_held_requests_from_its_root_context() {
    let up = Upstream::start("svc").await;
    let proxy = held_proxy(&up, "\"deny:300\"", "").await;
    for (g, _) in concurrent(&proxy, 4).await {
        assert_eq!(g.status, 403, "{g:?}");
        assert_eq!(g.header("x-held"), "denied");
        assert_eq!(g.body, "denied after discovery\n");
    }
    assert_eq!(up.hits(), 0, "a denied request reached the upstream");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_that_fails_while_holding_requests_fails_them() {
    let up = Upstream::start("svc").await;
    let proxy = held_proxy(&up, "\"trap:300\"", "").await;
    for (g, _) in concurrent(&proxy, 4).await {
        assert_eq!(g.status, 503, "fail_closed: {g:?}");
    }
    assert_eq!(
        up.hits(),
        0,
        "a request held by a failed filter reached the upstream"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_never_resumed_ends_at_its_timeout() {
    let up = Upstream::start("svc").await;
    let proxy = held_proxy(&up, "\"never:0\"", "request_timeout_ms: 800").await;
    let got = concurrent(&proxy, 3).await;
    for (g, took) in got {
        assert_eq!(g.status, 504, "{g:?}");
        assert!(
            took >= Duration::from_millis(700) && took < Duration::from_secs(5),
            "{took:?}"
        );
    }
    assert_eq!(up.hits(), 0);
    // The proxy still holds nothing for them.
    let clusters = proxy.clusters().await;
    assert_eq!(clusters["clusters"][0]["active_requests"], 0);
}

/// A proxy running `compat_hold` in `fetch` mode: its root context calls cluster `auth`.
async fn fetching_proxy(up: &Upstream, auth: &Upstream, status: u16) -> ProxyProcess {
    let yaml = chain(
        "svc",
        &[filter(
            "hold",
            &guest_filter("compat_hold"),
            &format!("\"fetch:{status}\""),
        )],
        &[
            cluster("svc", &[up.address()], ""),
            cluster("auth", &[auth.address()], ""),
        ],
    );
    ProxyProcess::start(&yaml).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_filter_fetches_from_its_root_context_before_it_lets_requests_through() {
    let up = Upstream::start("svc").await;
    let auth = Upstream::start_slow("auth", Duration::from_millis(500)).await;
    let proxy = fetching_proxy(&up, &auth, 200).await;
    let watcher = async {
        tokio::time::sleep(Duration::from_millis(250)).await;
        up.hits()
    };
    let (got, hits_while_fetching) = tokio::join!(concurrent(&proxy, 6), watcher);
    assert_eq!(
        hits_while_fetching, 0,
        "a request went on before the filter was ready"
    );
    for (g, _) in &got {
        assert_eq!(g.status, 200, "{g:?}");
        assert_eq!(g.echo()["headers"]["x-held"][0], "yes");
    }
    // One discovery call per worker's instance, sent from its root context (on_tick).
    assert!((1..=2).contains(&auth.hits()), "{}", auth.hits());
    assert_eq!(up.hits(), 6);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_root_context_fetch_denies_the_held_requests() {
    let up = Upstream::start("svc").await;
    let auth = Upstream::start_slow("auth", Duration::from_millis(300)).await;
    let proxy = fetching_proxy(&up, &auth, 503).await;
    for (g, _) in concurrent(&proxy, 4).await {
        assert_eq!(g.status, 403, "{g:?}");
        assert_eq!(g.body, "discovery failed\n");
    }
    assert_eq!(up.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_that_ended_while_held_is_gone_for_the_filter() {
    let up = Upstream::start("svc").await;
    // Held past the request timeout (400 ms): the streams end with 504 before the filter
    // becomes ready (3 s after it started: well after the requests' deadline even when a
    // loaded machine makes the proxy slow to start); then it cannot make their contexts
    // effective (BAD_ARGUMENT, as in Envoy), and knows they are gone.
    let proxy = held_proxy(&up, "\"allow:3000\"", "request_timeout_ms: 400").await;
    for (g, _) in concurrent(&proxy, 2).await {
        assert_eq!(g.status, 504, "{g:?}");
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let stats = proxy.stats().await;
        if metric_value(&stats, "weft_filter_hold_gone_total") == Some(2.0) {
            break;
        }
        assert!(Instant::now() < deadline, "{stats}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(up.hits(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn continuing_the_way_that_is_not_held_does_not_release_the_stream() {
    let up = Upstream::start("svc").await;
    // The filter continues the response of requests it holds in the request phase: as in
    // Envoy (request and response are continued apart), they stay held until the timeout.
    let proxy = held_proxy(&up, "\"wrong-way:200\"", "request_timeout_ms: 800").await;
    for (g, took) in concurrent(&proxy, 2).await {
        assert_eq!(g.status, 504, "{g:?}");
        assert!(took >= Duration::from_millis(700), "{took:?}");
    }
    assert_eq!(up.hits(), 0);
}
