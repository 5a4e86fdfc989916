//! Opaque TCP listeners on loopback: connections balanced over a cluster's endpoints (a dead
//! one skipped), the server speaking first, half-close both ways, the idle timeout,
//! `max_connections`, metrics, and configs that cannot work refused at startup.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::Duration;

use weft_tests::*;

fn tcp_config(endpoints: &[String], listener: &str, cluster: &str) -> String {
    let eps: String = endpoints
        .iter()
        .map(|a| format!("      - {{ address: \"{a}\" }}\n"))
        .collect();
    format!(
        "admin: {{ address: \"{{admin}}\" }}
listeners:
  - name: db
    address: \"{{listen}}\"
    protocol: tcp
    default_cluster: db
{listener}
clusters:
  - name: db
    connect_timeout_ms: 1000
    outlier: {{ consecutive_failures: 1, base_ejection_ms: 30000 }}
{cluster}
    endpoints:
{eps}"
    )
}

fn stat(stats: &str, series: &str) -> f64 {
    metric_value(stats, series).unwrap_or(0.0)
}

#[tokio::test]
async fn a_tcp_listener_balances_connections_with_the_server_speaking_first_and_half_close() {
    let any = SocketAddr::from(([127, 0, 0, 1], 0));
    let g1 = greeter(any, "g1").await;
    let g2 = greeter(any, "g2").await;
    let dead = format!("127.0.0.1:{}", free_port());
    let proxy =
        ProxyProcess::start(&tcp_config(&[g1.to_string(), dead, g2.to_string()], "", "")).await;

    let mut by_server = BTreeMap::<String, usize>::new();
    let message = "hello over tcp\r\n";
    for i in 0..8 {
        let (greeting, _, rest) = converse(proxy.addr, message)
            .await
            .unwrap_or_else(|e| panic!("conversation {i}: {e}\n{}", proxy.log()));
        let name = greeting.trim().strip_prefix("220 ").unwrap().to_owned();
        // The answer to the message, then (after our half-close) the server's goodbye.
        assert_eq!(rest, format!("HELLO OVER TCP\r\nbye {name}\r\n"));
        *by_server.entry(name).or_default() += 1;
    }
    assert_eq!(
        by_server.len(),
        2,
        "both live endpoints took connections: {by_server:?}"
    );
    assert_eq!(
        by_server.values().sum::<usize>(),
        8,
        "every connection succeeded"
    );

    // A relay's bytes are counted when it ends, just after its client saw the close.
    let labels = "{listener=\"db\",cluster=\"db\"}";
    let mut stats = proxy.stats().await;
    for _ in 0..100 {
        if stat(
            &stats,
            &format!("weft_tcp_connection_duration_seconds_count{labels}"),
        ) == 8.0
        {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
        stats = proxy.stats().await;
    }
    assert_eq!(
        stat(&stats, &format!("weft_tcp_connections_total{labels}")),
        8.0
    );
    assert_eq!(
        stat(&stats, &format!("weft_tcp_sent_bytes_total{labels}")),
        8.0 * message.len() as f64
    );
    let received = stat(&stats, &format!("weft_tcp_received_bytes_total{labels}"));
    assert_eq!(
        received,
        8.0 * ("220 g1\r\nHELLO OVER TCP\r\nbye g1\r\n".len() as f64)
    );
    assert_eq!(
        stat(
            &stats,
            &format!("weft_tcp_connection_duration_seconds_count{labels}")
        ),
        8.0
    );
    assert!(
        stat(
            &stats,
            "weft_upstream_connect_failures_total{cluster=\"db\"}"
        ) >= 1.0,
        "the dead endpoint was tried and skipped:\n{stats}"
    );
    assert_eq!(
        stat(&stats, &format!("weft_tcp_connections_active{labels}")),
        0.0
    );
}

#[tokio::test]
async fn idle_tcp_connections_are_closed_and_max_connections_refuses_the_next() {
    let g = greeter(SocketAddr::from(([127, 0, 0, 1], 0)), "g").await;
    let proxy = ProxyProcess::start(&tcp_config(
        &[g.to_string()],
        "    idle_timeout_ms: 400",
        "    limits: { max_connections: 1 }",
    ))
    .await;

    use tokio::io::AsyncReadExt;
    let mut first = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let mut greeting = [0u8; 7];
    first.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting, b"220 g\r\n");

    // The one connection the cluster allows is taken: the next is closed with nothing.
    let mut second = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let mut got = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), second.read_to_end(&mut got))
        .await
        .expect("the refused connection is closed")
        .ok();
    assert!(got.is_empty(), "no upstream behind it: {got:?}");

    // Silent past the idle timeout: closed by the proxy.
    let mut rest = Vec::new();
    let idle_close =
        tokio::time::timeout(Duration::from_secs(5), first.read_to_end(&mut rest)).await;
    assert!(idle_close.is_ok(), "the idle connection was closed");
    assert!(rest.is_empty(), "{rest:?}");

    // Its slot is free again, once the proxy has ended the relay (its client may see the
    // close a moment before): a connection made meanwhile is refused, and counted.
    let mut refused = 1.0;
    let mut again = None;
    for _ in 0..50 {
        match converse(proxy.addr, "again").await {
            Ok(done) => {
                again = Some(done);
                break;
            }
            Err(_) => {
                refused += 1.0;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
    }
    let (greeting, _, rest) = again.expect("the slot was freed");
    assert_eq!(
        (greeting.as_str(), rest.as_str()),
        ("220 g\r\n", "AGAINbye g\r\n")
    );

    let stats = proxy.stats().await;
    assert_eq!(
        stat(
            &stats,
            "weft_tcp_refused_total{listener=\"db\",cluster=\"db\"}"
        ),
        refused
    );
    assert_eq!(
        stat(
            &stats,
            "weft_circuit_breaker_overflows_total{cluster=\"db\",limit=\"max_connections\"}"
        ),
        refused,
        "{stats}"
    );
}

#[test]
fn tcp_and_capture_configs_that_cannot_work_are_refused_naming_the_field() {
    let no_cluster =
        tcp_config(&["127.0.0.1:1".into()], "", "").replace("    default_cluster: db\n", "");
    let (status, err) = run_proxy_args_expecting_failure(&no_cluster, &[]);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.contains("listeners[0].default_cluster: a `tcp` listener needs a default cluster"),
        "{err}"
    );

    let bad_port = tcp_config(
        &["127.0.0.1:1".into()],
        "    capture: { ports: { 8080: nope } }",
        "",
    );
    let (status, err) = run_proxy_args_expecting_failure(&bad_port, &[]);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.contains("listeners[0].capture.ports.8080: no cluster named `nope`"),
        "{err}"
    );

    let bad_wait = tcp_config(
        &["127.0.0.1:1".into()],
        "    capture: { detect_timeout_ms: 60000 }",
        "",
    );
    let (status, err) = run_proxy_args_expecting_failure(&bad_wait, &[]);
    assert_eq!(status.code(), Some(2), "{err}");
    assert!(
        err.contains("listeners[0].capture.detect_timeout_ms"),
        "{err}"
    );
}

#[tokio::test]
async fn network_filters_rewrite_opaque_tcp_both_ways_and_hold_partial_lines() {
    let g = greeter(SocketAddr::from(([127, 0, 0, 1], 0)), "g").await;
    let yaml = netfilter_config(g, "fail_closed");
    let proxy = ProxyProcess::start(&yaml).await;

    // The server's greeting comes through rewritten (upstream data, buffer 3); what the
    // client sends is masked on its way (downstream data, buffer 2); the half-close still
    // passes, and the server's goodbye comes back.
    let (greeting, _, rest) = converse(proxy.addr, "my secret\n").await.unwrap();
    assert_eq!(greeting, "221 g\r\n", "{}", proxy.log());
    assert_eq!(rest, "MY ******\nbye g\r\n");

    // A line sent in pieces is held by the filter (it pauses) until its end arrives, so
    // a word split across pieces is still masked.
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(proxy.addr).await.unwrap();
    let mut greeting = [0u8; 7];
    s.read_exact(&mut greeting).await.unwrap();
    for piece in ["a sec", "ret, a"] {
        s.write_all(piece.as_bytes()).await.unwrap();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Nothing reached the server yet: no echo while the filter holds the partial line.
    let mut early = [0u8; 1];
    let nothing = tokio::time::timeout(Duration::from_millis(200), s.read(&mut early)).await;
    assert!(nothing.is_err(), "bytes came back before the line ended");
    s.write_all(b"nd more\n").await.unwrap();
    s.shutdown().await.unwrap();
    let mut back = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut back))
        .await
        .unwrap()
        .unwrap();
    assert_eq!(
        String::from_utf8_lossy(&back),
        "A ******, AND MORE\nbye g\r\n"
    );

    // The filter's own metrics: two connections opened, two closed by their clients.
    let stats = proxy.stats().await;
    assert_eq!(
        stat(&stats, "weft_filter_netfilter_connections_total"),
        2.0,
        "{stats}"
    );
    assert_eq!(
        stat(&stats, "weft_filter_netfilter_closes_total"),
        2.0,
        "{stats}"
    );
}

/// A `tcp` listener with the netfilter guest under `policy`.
fn netfilter_config(upstream: SocketAddr, policy: &str) -> String {
    let filter = format!(
        "    filters: [ {{ name: netfilter, module: \"{}\", failure_policy: {policy} }} ]",
        guest_filter("compat_netfilter").display(),
    );
    format!(
        "wasm: {{ cache_dir: \"{}\" }}\n{}",
        shared_module_cache().display(),
        tcp_config(&[upstream.to_string()], &filter, "")
    )
}

#[tokio::test]
async fn a_network_filter_that_traps_closes_its_connection_or_is_skipped_by_policy() {
    let g = greeter(SocketAddr::from(([127, 0, 0, 1], 0)), "g").await;

    // fail_closed (the default): the connection it failed on is closed, and so are the next
    // ones on that worker while the filter is down.
    let closed = ProxyProcess::start_with(&netfilter_config(g, "fail_closed"), 1).await;
    let (greeting, _, rest) = converse(closed.addr, "boom\n").await.unwrap();
    assert_eq!(greeting, "221 g\r\n");
    assert_eq!(
        rest, "",
        "nothing after the trap: the connection was closed"
    );
    let next = converse(closed.addr, "hello\n").await;
    assert!(
        next.is_err(),
        "a fail_closed filter that is down closes connections: {next:?}"
    );
    let stats = closed.stats().await;
    assert_eq!(
        stat(
            &stats,
            "weft_filter_failures_total{filter=\"netfilter\",kind=\"trap\"}"
        ),
        1.0,
        "{stats}"
    );

    // fail_open: the connection goes on without the filter (nothing masked any more).
    let open = ProxyProcess::start_with(&netfilter_config(g, "fail_open"), 1).await;
    let (greeting, _, rest) = converse(open.addr, "boom secret\n").await.unwrap();
    assert_eq!(greeting, "221 g\r\n");
    assert_eq!(
        rest, "BOOM SECRET\nbye g\r\n",
        "the bytes passed unfiltered"
    );
}
