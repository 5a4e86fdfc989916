//! Swapping filter chains in place (SIGHUP): traffic keeps flowing without a failed
//! request, streams in flight finish on their old chain, and a bad chain is refused while
//! the running one keeps serving.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use weft_tests::*;

/// The `compat_basic` filter configured with greeting `version`; `module` overrides the
/// module path.
fn versioned(up: &Upstream, version: &str, module: Option<&str>) -> String {
    let module = module.map_or_else(
        || guest_filter("compat_basic").display().to_string(),
        str::to_owned,
    );
    crate::chain(
        "svc",
        &[format!(
            "{{ name: basic, module: \"{module}\", config: {{ greeting: {version} }} }}"
        )],
        &[crate::cluster("svc", &[up.address()], "")],
    )
}

/// The greeting the request went upstream with.
pub(crate) fn greeting(got: &Got) -> String {
    let cfg = got.echo()["headers"]["x-wasm-config"][0]
        .as_str()
        .unwrap_or("")
        .to_owned();
    serde_json::from_str::<serde_json::Value>(&cfg)
        .ok()
        .and_then(|v| v["greeting"].as_str().map(str::to_owned))
        .unwrap_or_default()
}

/// Clients sending `GET /x` through a proxy until stopped (at most two minutes), each
/// request paced at `pace` or back to back, half over HTTP/1.1 and half over HTTP/2. A
/// request fails unless it gets 200 with a greeting starting with `v`.
pub(crate) struct Traffic {
    stop: Arc<AtomicBool>,
    sent: Arc<AtomicUsize>,
    failed: Arc<AtomicUsize>,
    clients: Vec<tokio::task::JoinHandle<()>>,
}

impl Traffic {
    /// Starts `clients` clients.
    pub(crate) fn start(proxy: Arc<ProxyProcess>, clients: usize, pace: Option<Duration>) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let (sent, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        let clients = (0..clients)
            .map(|i| {
                let (proxy, stop, sent, failed) =
                    (proxy.clone(), stop.clone(), sent.clone(), failed.clone());
                tokio::spawn(async move {
                    let client = if i % 2 == 0 { h1_client() } else { h2_client() };
                    let mut tick = pace.map(|p| {
                        let mut t = tokio::time::interval(p);
                        t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
                        t
                    });
                    let deadline = Instant::now() + Duration::from_secs(120);
                    while !stop.load(Ordering::SeqCst) && Instant::now() < deadline {
                        if let Some(t) = tick.as_mut() {
                            t.tick().await;
                        }
                        sent.fetch_add(1, Ordering::SeqCst);
                        match get(&client, &proxy.url("/x")).await {
                            Ok(g) if g.status == 200 && greeting(&g).starts_with('v') => {}
                            other => {
                                failed.fetch_add(1, Ordering::SeqCst);
                                eprintln!("failed: {other:?}");
                            }
                        }
                    }
                })
            })
            .collect();
        Self {
            stop,
            sent,
            failed,
            clients,
        }
    }

    /// Stops the clients; returns the requests sent and failed.
    pub(crate) async fn finish(self) -> (usize, usize) {
        self.stop.store(true, Ordering::SeqCst);
        for c in self.clients {
            c.await.expect("client");
        }
        (
            self.sent.load(Ordering::SeqCst),
            self.failed.load(Ordering::SeqCst),
        )
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_swaps_under_traffic_fail_no_request() {
    let up = Upstream::start("svc").await;
    let proxy = Arc::new(ProxyProcess::start(&versioned(&up, "v0", None)).await);
    let traffic = Traffic::start(proxy.clone(), 4, None);
    // A slow request started on v0 finishes on v0, whatever is swapped meanwhile.
    let slow = {
        let proxy = proxy.clone();
        tokio::spawn(async move { get(&h1_client(), &proxy.url("/delay/400/slow")).await })
    };
    tokio::time::sleep(Duration::from_millis(50)).await;
    for v in 1..=100 {
        proxy.reload(&versioned(&up, &format!("v{v}"), None));
        tokio::time::sleep(Duration::from_millis(15)).await;
    }
    let slow = slow.await.unwrap().unwrap();
    assert_eq!(
        greeting(&slow),
        "v0",
        "the in-flight request kept its chain"
    );

    // The last version wins once its reload is done.
    let client = h1_client();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let got = get(&client, &proxy.url("/x")).await.unwrap();
        if greeting(&got) == "v100" {
            break;
        }
        assert!(Instant::now() < deadline, "still {}", greeting(&got));
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (sent, failed) = traffic.finish().await;
    assert_eq!(failed, 0, "of {sent} requests");
    assert!(sent > 200, "traffic flowed during the swaps: {sent}");
    let stats = proxy.stats().await;
    let swaps = metric_value(&stats, "weft_filter_chain_swaps_total").unwrap_or(0.0);
    assert!(swaps >= 1.0, "{stats}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_chain_is_refused_and_the_running_one_keeps_serving() {
    let up = Upstream::start("svc").await;
    let proxy = ProxyProcess::start(&versioned(&up, "good", None)).await;
    let garbage = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(garbage.path(), b"not wasm at all").unwrap();
    proxy.reload(&versioned(
        &up,
        "bad",
        Some(&garbage.path().display().to_string()),
    ));
    let deadline = Instant::now() + Duration::from_secs(10);
    let stats = loop {
        let stats = proxy.stats().await;
        if metric_value(&stats, "weft_filter_chain_swap_failures_total") == Some(1.0) {
            break stats;
        }
        assert!(Instant::now() < deadline, "no refusal counted:\n{stats}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(
        metric_value(&stats, "weft_filter_chain_swaps_total"),
        Some(0.0)
    );
    let got = get(&h1_client(), &proxy.url("/x")).await.unwrap();
    assert_eq!(greeting(&got), "good", "the running chain stayed");
    assert!(
        proxy.log().contains(&garbage.path().display().to_string()),
        "the refusal names the module:\n{}",
        proxy.log()
    );
    // A broken config file is refused the same way.
    proxy.reload("listeners: [ { name: nope");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let got = get(&h1_client(), &proxy.url("/x")).await.unwrap();
    assert_eq!(greeting(&got), "good");
}
