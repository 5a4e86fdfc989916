//! Load-balancing distributions through the real proxy.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use weft_tests::*;

use crate::config;

/// Sends `n` GETs with `concurrency` clients in parallel; panics on any failure.
async fn load(proxy: &ProxyProcess, n: usize, concurrency: usize) {
    let next = Arc::new(AtomicUsize::new(0));
    let mut tasks = Vec::new();
    for _ in 0..concurrency {
        let next = next.clone();
        let url = proxy.url("/");
        tasks.push(tokio::spawn(async move {
            let client = h1_client();
            while next.fetch_add(1, Ordering::SeqCst) < n {
                let got = get(&client, &url).await.unwrap();
                assert_eq!(got.status, 200, "{got:?}");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
}

fn share(part: usize, total: usize) -> f64 {
    part as f64 / total as f64
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn weighted_policies_honour_weights() {
    for policy in ["weighted", "random"] {
        let a = Upstream::start("a").await;
        let b = Upstream::start("b").await;
        let cfg = config(
            "",
            &format!("    lb_policy: {policy}"),
            &[(a.address(), 1), (b.address(), 3)],
        );
        let proxy = ProxyProcess::start(&cfg).await;
        load(&proxy, 2000, 8).await;
        assert_eq!(a.hits() + b.hits(), 2000);
        let s = share(a.hits(), 2000);
        assert!((s - 0.25).abs() <= 0.05, "{policy}: weight 1 of 4 got {s}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn round_robin_spreads_evenly() {
    let ups = [
        Upstream::start("a").await,
        Upstream::start("b").await,
        Upstream::start("c").await,
    ];
    let eps: Vec<_> = ups.iter().map(|u| (u.address(), 1)).collect();
    let proxy = ProxyProcess::start(&config("", "    lb_policy: round_robin", &eps)).await;
    load(&proxy, 1500, 6).await;
    for u in &ups {
        let s = share(u.hits(), 1500);
        assert!((s - 1.0 / 3.0).abs() <= 0.05, "{} got {s}", u.name);
    }
}

/// Runs `concurrency` clients for `secs` seconds and returns the fast endpoint's share.
async fn fast_share(policy: &str) -> f64 {
    let fast = Upstream::start("fast").await;
    let slow = Upstream::start_slow("slow", Duration::from_millis(60)).await;
    let cfg = config(
        "",
        &format!("    lb_policy: {policy}"),
        &[(fast.address(), 1), (slow.address(), 1)],
    );
    let proxy = ProxyProcess::start(&cfg).await;
    let until = Instant::now() + Duration::from_secs(2);
    let mut tasks = Vec::new();
    for _ in 0..8 {
        let url = proxy.url("/");
        tasks.push(tokio::spawn(async move {
            let client = h1_client();
            while Instant::now() < until {
                let got = get(&client, &url).await.unwrap();
                assert_eq!(got.status, 200);
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    share(fast.hits(), fast.hits() + slow.hits())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_aware_policies_avoid_a_slow_endpoint() {
    // Round robin would give each endpoint half; load-aware policies starve the slow one.
    let rr = fast_share("round_robin").await;
    assert!((rr - 0.5).abs() < 0.05, "round_robin: {rr}");
    for policy in ["least_request", "peak_ewma"] {
        let s = fast_share(policy).await;
        assert!(s > 0.8, "{policy}: fast endpoint got only {s}");
    }
}
