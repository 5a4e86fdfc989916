//! The WASM host's own defences, end to end: a guest cannot make the proxy allocate past its
//! limits through WASI `random_get`, and the compiled-module cache is trusted only when it is
//! private to the proxy's user and its entries verify.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use weft_tests::*;

use crate::eps;

/// A config whose listener runs `module` as filter `basic` (one worker), caching compiled
/// modules in `cache`.
fn config(up: &Upstream, module: &Path, cache: &Path) -> String {
    let filter = format!(
        "    filters:
      - name: basic
        module: \"{}\"
        failure_policy: fail_closed
        limits: {{ memory_mb: 16 }}
",
        module.display()
    );
    crate::config(&filter, "", &eps(&[up])).replace(
        "drain: { timeout_ms: 5000 }",
        &format!(
            "drain: {{ timeout_ms: 5000 }}\nwasm: {{ cache_dir: \"{}\" }}",
            cache.display()
        ),
    )
}

/// The peak resident memory of process `pid`, in bytes (`VmHWM`).
fn peak_rss(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("/proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmHWM");
    kb * 1024
}

/// GET `path` from `proxy`, bounded to `limit`.
async fn get_within(proxy: &ProxyProcess, path: &str, limit: Duration) -> Got {
    tokio::time::timeout(limit, get(&h1_client(), &proxy.url(path)))
        .await
        .unwrap_or_else(|_| panic!("{path} took more than {limit:?}"))
        .unwrap_or_else(|e| panic!("{path}: {e}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_get_for_a_huge_length_costs_the_proxy_nothing() {
    let up = Upstream::start("u").await;
    let proxy = ProxyProcess::start_with(
        &config(&up, &guest_filter("compat_basic"), &shared_module_cache()),
        1,
    )
    .await;

    // Normal lengths: random bytes, different each call, none of the 1 KiB pieces of a
    // 200 KiB buffer left zero.
    let normal = get_within(&proxy, "/random", Duration::from_secs(10)).await;
    assert_eq!(normal.status, 200, "{normal:?}");
    assert_eq!(normal.header("x-random-errno"), "[0, 0, 0, 0]");
    let (a, b) = (normal.header("x-random-a"), normal.header("x-random-b"));
    assert_eq!(a.len(), 64);
    assert_ne!(a, b);
    assert_ne!(a, "0".repeat(64));
    assert_eq!(normal.header("x-random-zero-chunks"), "0");

    // 4 GiB - 1 and 2 GiB - 1 from a 16-byte buffer: EFAULT, at once, with no allocation
    // of that size in the proxy.
    let before = peak_rss(proxy.pid());
    let huge = get_within(&proxy, "/random/huge", Duration::from_secs(5)).await;
    assert_eq!(huge.status, 200, "{huge:?}\n{}", proxy.log());
    assert_eq!(huge.header("x-random-errno"), "21,21");
    let after = peak_rss(proxy.pid());
    assert!(
        after < before + 64 * 1024 * 1024,
        "peak RSS went from {before} to {after} bytes"
    );

    // The instance is fine and randomness still works.
    let again = get_within(&proxy, "/random", Duration::from_secs(10)).await;
    assert_eq!(again.header("x-random-errno"), "[0, 0, 0, 0]");
    assert_ne!(again.header("x-random-a"), a);
}

/// The cache entries (`*.cwasm`) in `dir`.
fn entries(dir: &Path) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = std::fs::read_dir(dir)
        .expect("cache dir")
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "cwasm"))
        .collect();
    out.sort();
    out
}

/// Sends `/` and says whether `compat_basic` ran (its request edit reached the upstream).
async fn basic_ran(proxy: &ProxyProcess) -> bool {
    let got = get(&h1_client(), &proxy.url("/")).await.unwrap();
    assert_eq!(got.status, 200, "{got:?}");
    got.echo()["headers"]["x-wasm-added"][0] == "1"
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_entry_planted_under_another_modules_name_is_not_loaded() {
    let up = Upstream::start("u").await;
    let cache = tempfile::tempdir().unwrap();
    let (noop, basic) = (guest_filter("compat_noop"), guest_filter("compat_basic"));

    // The no-op filter's compiled code goes in first, then the basic filter's.
    drop(ProxyProcess::start(&config(&up, &noop, cache.path())).await);
    let noop_entry = entries(cache.path()).pop().expect("noop entry");
    let first = ProxyProcess::start(&config(&up, &basic, cache.path())).await;
    assert!(basic_ran(&first).await);
    drop(first);
    let basic_entry = entries(cache.path())
        .into_iter()
        .find(|p| *p != noop_entry)
        .expect("basic entry");

    // Someone puts the no-op filter's compiled code under the basic filter's name: it is
    // well-formed compiled code of this very engine, but not of that module.
    std::fs::copy(&noop_entry, &basic_entry).unwrap();
    let second = ProxyProcess::start(&config(&up, &basic, cache.path())).await;
    assert!(
        basic_ran(&second).await,
        "the planted code ran instead of the configured module"
    );
    let log = second.log();
    assert!(log.contains("compiled module in"), "{log}");
    assert!(!log.contains("loaded compiled module from cache"), "{log}");
    drop(second);

    // The entry was rewritten: the next start loads it.
    let third = ProxyProcess::start(&config(&up, &basic, cache.path())).await;
    assert!(
        third.log().contains("loaded compiled module from cache"),
        "{}",
        third.log()
    );
    assert!(basic_ran(&third).await);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cache_dir_others_can_write_is_a_startup_error_naming_it() {
    let up = Upstream::start("u").await;
    let cache = tempfile::tempdir().unwrap();
    for mode in [0o770, 0o777] {
        std::fs::set_permissions(cache.path(), std::fs::Permissions::from_mode(mode)).unwrap();
        let yaml = render(
            &config(&up, &guest_filter("compat_basic"), cache.path()),
            free_port(),
            free_port(),
        );
        let (status, err) = run_proxy_expecting_failure(&yaml, "proxy.yaml");
        assert_eq!(status.code(), Some(2), "{err}");
        assert!(
            err.contains(&cache.path().display().to_string()),
            "names the dir: {err}"
        );
        assert!(err.contains("writable"), "{err}");
        assert!(entries(cache.path()).is_empty(), "nothing written there");
    }
    tokio::time::sleep(Duration::ZERO).await;
}
