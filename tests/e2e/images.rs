//! The container images (`deploy/images/build.sh`, which the test command runs first): built
//! FROM scratch from static binaries, small, non-root, labelled; the proxy image serves a
//! config mounted into it, in a Docker network this test creates, to an upstream on the
//! host; the control image runs `weft-control` and `weftctl`.

use std::net::{IpAddr, SocketAddr};
use std::process::Command;
use std::time::{Duration, Instant};

use weft_tests::*;

/// `docker <args>`: stdout, or a panic naming the command and its stderr.
fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("docker (the test command needs a Docker engine)");
    assert!(
        out.status.success(),
        "docker {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// Containers and a network this test made, removed by name when dropped.
struct Made {
    containers: Vec<String>,
    network: String,
}

impl Drop for Made {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = Command::new("docker").args(["rm", "-f", c]).output();
        }
        let _ = Command::new("docker")
            .args(["network", "rm", &self.network])
            .output();
    }
}

#[test]
fn the_images_are_small_static_non_root_and_labelled() {
    for (image, binaries) in [
        ("weft-proxy:dev", vec!["weft-proxy"]),
        ("weft-control:dev", vec!["weft-control", "weftctl"]),
    ] {
        let size: u64 = docker(&["image", "inspect", "-f", "{{.Size}}", image])
            .parse()
            .unwrap();
        eprintln!("{image}: {} KiB", size / 1024);
        assert!(size <= 20 * 1024 * 1024, "{image} is {size} bytes");
        let user = docker(&["image", "inspect", "-f", "{{.Config.User}}", image]);
        assert_eq!(user, "65532:65532", "{image} runs as a non-root user");
        let labels = docker(&["image", "inspect", "-f", "{{json .Config.Labels}}", image]);
        for key in [
            "org.opencontainers.image.title",
            "org.opencontainers.image.version",
            "org.opencontainers.image.revision",
            "org.opencontainers.image.licenses",
        ] {
            assert!(labels.contains(key), "{image}: {labels}");
        }
        // One layer per COPY (users, certificates, state dir, binaries) and nothing else:
        // no base image.
        let layers = docker(&["image", "inspect", "-f", "{{len .RootFS.Layers}}", image]);
        assert_eq!(layers, "4", "{image}");
        for bin in binaries {
            let out = Command::new("docker")
                .args([
                    "run",
                    "--rm",
                    "--entrypoint",
                    &format!("/usr/local/bin/{bin}"),
                    image,
                    "--version",
                ])
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{bin}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            assert!(String::from_utf8_lossy(&out.stdout).contains(bin), "{bin}");
        }
        let out = Command::new("docker")
            .args([
                "run",
                "--rm",
                "--entrypoint",
                "/bin/sh",
                image,
                "-c",
                "true",
            ])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{image} has no shell");
    }
}

#[test]
fn the_init_image_applies_and_removes_the_capture_rules_in_a_container() {
    let labels = docker(&[
        "image",
        "inspect",
        "-f",
        "{{json .Config.Labels}}",
        "weft-init:dev",
    ]);
    assert!(
        labels.contains("\"org.opencontainers.image.title\":\"weft-init\""),
        "{labels}"
    );
    let rules = docker(&["run", "--rm", "weft-init:dev", "--dry-run"]);
    assert!(
        rules.contains("-A WEFT_OUTPUT -m owner --uid-owner 65532 -j RETURN"),
        "{rules}"
    );
    // Applied for real in another container's network namespace (as a pod's init container
    // does), with the image's own iptables and extensions; listed; removed.
    let name = format!("weft-init-test-{}", std::process::id());
    let _made = Made {
        containers: vec![name.clone()],
        network: String::new(),
    };
    docker(&[
        "run",
        "-d",
        "--name",
        &name,
        "weft-demo:dev",
        "--name",
        "app",
        "--listen",
        "0.0.0.0:8080",
    ]);
    let netns = format!("container:{name}");
    let in_app = |args: &[&str]| {
        let mut all = vec!["run", "--rm", "--network", &netns, "--cap-add", "NET_ADMIN"];
        all.extend_from_slice(args);
        docker(&all)
    };
    in_app(&["weft-init:dev"]);
    let listed = in_app(&[
        "--entrypoint",
        "/usr/sbin/iptables-nft-save",
        "weft-init:dev",
        "-t",
        "nat",
    ]);
    assert!(
        listed.contains("-A OUTPUT -p tcp -j WEFT_OUTPUT"),
        "{listed}"
    );
    assert!(
        listed.contains("-A WEFT_IN_REDIRECT -p tcp -j REDIRECT --to-ports 15006"),
        "{listed}"
    );
    in_app(&["weft-init:dev", "--undo"]);
    let listed = in_app(&[
        "--entrypoint",
        "/usr/sbin/iptables-nft-save",
        "weft-init:dev",
        "-t",
        "nat",
    ]);
    assert!(!listed.contains("WEFT"), "{listed}");
    let out = Command::new("docker")
        .args([
            "run",
            "--rm",
            "--entrypoint",
            "/bin/sh",
            "weft-init:dev",
            "-c",
            "true",
        ])
        .output()
        .unwrap();
    assert!(!out.status.success(), "the init image has no shell");
    let without = Command::new("docker")
        .args(["run", "--rm", "weft-init:dev"])
        .output()
        .unwrap();
    assert!(
        !without.status.success(),
        "without NET_ADMIN the rules cannot be applied"
    );
    assert!(
        String::from_utf8_lossy(&without.stderr).contains("weft-proxy init:"),
        "a clear error: {}",
        String::from_utf8_lossy(&without.stderr)
    );
}

#[test]
fn the_demo_image_runs_its_service_as_a_user_whose_traffic_is_captured() {
    assert_eq!(
        docker(&[
            "image",
            "inspect",
            "-f",
            "{{.Config.User}}",
            "weft-demo:dev"
        ]),
        "1000:1000"
    );
    let version = docker(&["run", "--rm", "weft-demo:dev", "--version"]);
    assert!(version.starts_with("demo-service"), "{version}");
    let filters = docker(&[
        "run",
        "--rm",
        "--entrypoint",
        "/bin/busybox",
        "weft-demo:dev",
        "ls",
        "/filters",
    ]);
    for f in [
        "router",
        "retry",
        "fault",
        "telemetry",
        "ratelimit",
        "authz",
    ] {
        assert!(
            filters.contains(&format!("weft_filter_{f}.wasm")),
            "{filters}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_proxy_image_serves_a_mounted_config_in_a_docker_network() {
    let dir = tempfile::tempdir().unwrap();
    let tag = std::process::id();
    let network = format!("weft-test-{tag}");
    let mut made = Made {
        containers: Vec::new(),
        network: network.clone(),
    };
    docker(&["network", "create", &network]);
    // The host end of the network: where the container reaches this test's upstream.
    let gateway: IpAddr = docker(&[
        "network",
        "inspect",
        "-f",
        "{{(index .IPAM.Config 0).Gateway}}",
        &network,
    ])
    .parse()
    .unwrap();
    let up = Upstream::start_at("host-upstream", SocketAddr::new(gateway, 0)).await;
    let config = dir.path().join("proxy.yaml");
    std::fs::write(
        &config,
        format!(
            "admin: {{ address: \"0.0.0.0:9901\" }}
listeners:
  - {{ name: ingress, address: \"0.0.0.0:8080\", default_cluster: svc }}
clusters:
  - {{ name: svc, endpoints: [ {{ address: \"{}\" }} ] }}
",
            up.address()
        ),
    )
    .unwrap();
    let name = format!("weft-test-proxy-{tag}");
    made.containers.push(name.clone());
    let started = Instant::now();
    docker(&[
        "run",
        "-d",
        "--name",
        &name,
        "--network",
        &network,
        "-v",
        &format!("{}:/etc/weft/proxy.yaml:ro", config.display()),
        "weft-proxy:dev",
    ]);
    let ip = docker(&[
        "inspect",
        "-f",
        "{{range .NetworkSettings.Networks}}{{.IPAddress}}{{end}}",
        &name,
    ]);
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(g) = get(&h1_client(), &format!("http://{ip}:9901/ready")).await
            && g.status == 200
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not ready: {}",
            docker(&["logs", &name])
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    eprintln!("docker run to ready: {} ms", started.elapsed().as_millis());
    let got = get(&h1_client(), &format!("http://{ip}:8080/through"))
        .await
        .unwrap();
    assert_eq!(got.status, 200, "{got:?}");
    assert_eq!(got.header("x-upstream"), "host-upstream");
    // It runs as the image's user, and says it is ready in its log.
    let top = docker(&["top", &name, "-o", "pid,uid,comm"]);
    assert!(top.contains("65532"), "{top}");
    let logs = Command::new("docker")
        .args(["logs", &name])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&logs.stderr).contains("weft-proxy ready"),
        "{logs:?}"
    );
    drop(made);
}
