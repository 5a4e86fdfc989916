//! The compose mesh (`deploy/compose`), as a user runs it: `docker-compose up` on the images
//! `deploy/images/build.sh` made (the test command builds them first), then real HTTP calls
//! from the host to service1, whose app calls `http://service2:8080` knowing nothing of the
//! mesh: the calls are captured, split 1:3 over service2's instances over mesh mTLS, faults
//! are injected by the chain from the control service, and when an instance's container is
//! killed the mesh routes around it. `docker-compose down -v` at the end, whatever happens.

use std::path::PathBuf;
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use weft_tests::*;

/// A compose project this test brought up, taken down (with its volumes) when dropped.
struct Project {
    name: String,
    net: String,
}

impl Project {
    fn file() -> PathBuf {
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/compose/docker-compose.yml")
    }

    fn run(&self, args: &[&str]) -> Output {
        Command::new("docker-compose")
            .arg("-f")
            .arg(Self::file())
            .args(["-p", &self.name])
            .args(args)
            .env("WEFT_NET", &self.net)
            .output()
            .expect("docker-compose (the test command needs Docker Compose)")
    }

    fn ok(&self, args: &[&str]) -> String {
        let out = self.run(args);
        assert!(
            out.status.success(),
            "docker-compose {}: {}\n{}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr),
            self.logs()
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    fn logs(&self) -> String {
        let out = self.run(&["logs", "--no-color", "--tail", "30"]);
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    /// The host address a service's container port is published on.
    fn port(&self, service: &str, port: u16) -> std::net::SocketAddr {
        self.ok(&["port", service, &port.to_string()])
            .parse()
            .expect("a published address")
    }
}

impl Drop for Project {
    fn drop(&mut self) {
        let _ = self.run(&["down", "-v", "--remove-orphans", "-t", "2"]);
    }
}

/// service1's answer to `GET path` with `headers`: status and JSON body.
async fn call(
    at: std::net::SocketAddr,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, serde_json::Value) {
    let mut req = format!("GET {path} HTTP/1.1\r\nhost: service1\r\nconnection: close\r\n");
    for (k, v) in headers {
        req += &format!("{k}: {v}\r\n");
    }
    req += "\r\n";
    match raw_request(at, req.as_bytes()).await {
        Ok(raw) => {
            let body = raw.split_once("\r\n\r\n").map_or("", |(_, b)| b);
            (
                status_of(&raw),
                serde_json::from_str(body.trim()).unwrap_or_default(),
            )
        }
        Err(_) => (0, serde_json::Value::Null),
    }
}

#[tokio::test]
async fn the_compose_mesh_splits_captured_calls_over_mtls_and_routes_around_a_killed_instance() {
    let pid = std::process::id();
    let project = Project {
        name: format!("weftmesh{pid}"),
        net: format!("10.{}.{}", 90 + pid % 60, (pid / 60) % 250),
    };
    project.ok(&["up", "-d", "--quiet-pull"]);
    let app = project.port("service1", 8080);
    let admin = project.port("service1", 15000);

    // Up: the setup job ran, the sidecars enrolled and took their chains, service2's
    // instances registered.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let (status, body) = call(app, "/hello", &[]).await;
        if status == 200
            && body["upstream"]["service"]
                .as_str()
                .is_some_and(|s| s.starts_with("service2"))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the mesh did not come up: {status} {body}\n{}",
            project.logs()
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // Both instances registered and known to service1's sidecar.
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let clusters = raw_request(
            admin,
            b"GET /clusters HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n",
        )
        .await
        .unwrap_or_default();
        if clusters.matches(":8080\"").count() >= 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "service2's instances: {clusters}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // 400 calls: weights 1:3, every hop between the sidecars mutual TLS.
    let mut b = 0;
    for i in 0..400 {
        let (status, body) = call(app, "/", &[]).await;
        assert_eq!(status, 200, "call {i}: {body}");
        let up = &body["upstream"];
        assert_eq!(
            up["x-forwarded-proto"], "https",
            "the sidecars spoke mesh TLS: {body}"
        );
        assert!(
            !up["traceparent"].as_str().unwrap_or("").is_empty(),
            "the telemetry filter ran: {body}"
        );
        if up["service"] == "service2-b" {
            b += 1;
        }
    }
    println!("service2-b took {b} of 400 calls");
    assert!(
        (240..=360).contains(&b),
        "service2-b took {b} of 400 calls, not about 300"
    );

    // The chain from the control service runs on the captured calls: a fault on request.
    let (status, body) = call(app, "/", &[("x-weft-fault-abort", "503")]).await;
    assert_eq!(status, 503, "{body}");

    let stats = raw_request(
        admin,
        b"GET /stats/prometheus HTTP/1.1\r\nhost: localhost\r\nconnection: close\r\n\r\n",
    )
    .await
    .unwrap();
    let outbound_2xx = metric_value(
        &stats,
        "weft_requests_total{listener=\"outbound\",cluster=\"service2\",status_class=\"2xx\"}",
    );
    assert!(outbound_2xx.unwrap_or(0.0) >= 400.0, "{stats}");

    // service2-b's container dies: retries and outlier detection keep every call working.
    project.ok(&["kill", "service2-b"]);
    for i in 0..40 {
        let (status, body) = call(app, "/", &[]).await;
        assert_eq!(
            status,
            200,
            "call {i} after the kill: {body}\n{}",
            project.logs()
        );
        assert_eq!(body["upstream"]["service"], "service2-a");
    }
}
