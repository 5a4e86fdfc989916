//! The standard rate limit filter (filters/ratelimit, built on weft-sdk) in the real proxy:
//! one bucket for all workers, holding under concurrency.

use std::sync::Arc;

use weft_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_shared_by_all_workers_holds_under_concurrency() {
    let up = Upstream::start("svc").await;
    let module = standard_filter("weft_filter_ratelimit");
    let config = "{ rules: [ { name: all, rate_per_second: 0.1, burst: 50 } ] }";
    let yaml = crate::chain(
        "svc",
        &[crate::filter("ratelimit", &module, config)],
        &[crate::cluster("svc", &[up.address()], "")],
    );
    // Two workers, each with its own filter instance: only a shared bucket gives 50.
    let proxy = Arc::new(ProxyProcess::start_with(&yaml, 2).await);
    let mut tasks = Vec::new();
    for _ in 0..20 {
        let proxy = proxy.clone();
        tasks.push(tokio::spawn(async move {
            // A connection of its own per task, so both workers get traffic.
            let client = h1_client();
            let mut counts = (0, 0);
            for _ in 0..10 {
                let got = get(&client, &proxy.url("/")).await.unwrap();
                match got.status {
                    200 => counts.0 += 1,
                    429 => {
                        assert!(got.header("retry-after").parse::<u64>().unwrap() >= 1);
                        assert_eq!(got.header("x-weft-ratelimit"), "all");
                        counts.1 += 1;
                    }
                    s => panic!("unexpected {s}"),
                }
            }
            counts
        }));
    }
    let (mut ok, mut limited) = (0, 0);
    for t in tasks {
        let (a, b) = t.await.unwrap();
        ok += a;
        limited += b;
    }
    assert_eq!(ok + limited, 200);
    // The burst, plus at most a token or two refilled while the test ran (one per 10 s).
    assert!((50..=52).contains(&ok), "{ok} allowed");
    assert_eq!(up.hits(), ok, "limited requests never reach the upstream");
}
