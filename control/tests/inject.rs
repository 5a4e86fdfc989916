//! `weftctl inject` and the shipped Kubernetes manifests, offline: the injected demo matches
//! its golden file (`WEFT_UPDATE_GOLDEN=1` writes it again), every manifest validates
//! against the Kubernetes OpenAPI schema (kubernetes-validate, strict, from PyPI: the test
//! command installs it), and the sidecar config inject makes is a config the proxy takes.

use std::path::{Path, PathBuf};
use std::process::Command;

fn manifests() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes")
}

fn weftctl_inject(file: &Path) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_weftctl"))
        .args([
            "inject",
            "--proxy-image",
            "weft-proxy:0.1.0",
            "--init-image",
            "weft-init:0.1.0",
            "-f",
        ])
        .arg(file)
        .output()
        .expect("weftctl");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The Kubernetes version the manifests are checked against (native sidecars: 1.29+).
const KUBERNETES: &str = "1.33.0";

/// `kubernetes-validate --strict` on `file`: whether it passed, and what it said.
fn validate(file: &Path) -> (bool, String) {
    let out = Command::new("python3")
        .args(["-m", "kubernetes_validate", "--strict", "-k", KUBERNETES])
        .arg(file)
        .output()
        .expect("python3");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        !text.contains("No module named kubernetes_validate"),
        "kubernetes-validate is not installed (pip install kubernetes-validate)"
    );
    (out.status.success(), text)
}

#[test]
fn inject_matches_its_golden_file() {
    let got = weftctl_inject(&manifests().join("examples/demo.yaml"));
    let golden = manifests().join("examples/demo.injected.yaml");
    if std::env::var_os("WEFT_UPDATE_GOLDEN").is_some() {
        std::fs::write(&golden, &got).unwrap();
    }
    let want =
        std::fs::read_to_string(&golden).expect("the golden file (WEFT_UPDATE_GOLDEN=1 writes it)");
    assert_eq!(
        got, want,
        "weftctl inject changed: review, then WEFT_UPDATE_GOLDEN=1"
    );
    // Injecting the injected manifest again changes nothing but the ConfigMaps it already has
    // (they are not workloads).
    let dir = tempfile::tempdir().unwrap();
    let again = dir.path().join("again.yaml");
    std::fs::write(&again, &got).unwrap();
    assert_eq!(weftctl_inject(&again), got, "inject is idempotent");
}

#[test]
fn the_shipped_and_injected_manifests_validate_against_the_kubernetes_schema() {
    for file in [
        "weft-control.yaml",
        "examples/demo.yaml",
        "examples/demo.injected.yaml",
    ] {
        let (ok, text) = validate(&manifests().join(file));
        assert!(ok, "{file}:\n{text}");
    }
    // The validator does refuse what Kubernetes would: a misspelt field of the sidecar.
    let injected =
        std::fs::read_to_string(manifests().join("examples/demo.injected.yaml")).unwrap();
    let broken = injected.replacen(
        "restartPolicy: Always",
        "restartPolicy: Always\n      restartPolcy: Always",
        1,
    );
    assert_ne!(broken, injected);
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("broken.yaml");
    std::fs::write(&file, broken).unwrap();
    let (ok, text) = validate(&file);
    assert!(!ok, "a misspelt field passed:\n{text}");
}

#[test]
fn injected_workloads_get_capture_a_native_sidecar_and_a_config_the_proxy_takes() {
    let out = weftctl_inject(&manifests().join("examples/demo.yaml"));
    let docs: Vec<serde_yaml_ng::Value> = out
        .split("\n---\n")
        .map(|d| serde_yaml_ng::from_str(d).unwrap())
        .collect();
    let kinds: Vec<&str> = docs.iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "Deployment",
            "ConfigMap",
            "Deployment",
            "ConfigMap",
            "Service",
            "Job",
            "ConfigMap"
        ]
    );
    let service1 = &docs[0]["spec"]["template"]["spec"];
    let inits = service1["initContainers"].as_sequence().unwrap();
    assert_eq!(inits[0]["name"], "weft-init");
    assert_eq!(inits[1]["name"], "weft-proxy");
    assert_eq!(inits[1]["restartPolicy"], "Always", "a native sidecar");
    assert_eq!(inits[1]["startupProbe"]["httpGet"]["port"], 15000);
    let caps = &inits[0]["securityContext"]["capabilities"]["add"];
    assert_eq!(
        caps,
        &serde_yaml_ng::from_str::<serde_yaml_ng::Value>("[NET_ADMIN, NET_RAW]").unwrap()
    );
    let volumes = serde_yaml_ng::to_string(&service1["volumes"]).unwrap();
    assert!(
        volumes.contains("secretName: weft-token-service1"),
        "{volumes}"
    );
    assert!(volumes.contains("name: weft-sidecar-service1"), "{volumes}");
    // The job's pod: its own container is the only one the Job waits for.
    let job = &docs[5]["spec"]["template"]["spec"];
    assert_eq!(job["containers"].as_sequence().unwrap().len(), 1);
    // The sidecar configs parse and validate as weft-proxy configs.
    for cm in docs.iter().filter(|d| d["kind"] == "ConfigMap") {
        let text = cm["data"]["proxy.yaml"].as_str().unwrap();
        let config: weft_config::Config = serde_yaml_ng::from_str(text).unwrap();
        config
            .validate()
            .unwrap_or_else(|e| panic!("{e:?}\n{text}"));
    }
    let cm1: weft_config::Config =
        serde_yaml_ng::from_str(docs[1]["data"]["proxy.yaml"].as_str().unwrap()).unwrap();
    let inbound = cm1.listeners.iter().find(|l| l.name == "inbound").unwrap();
    assert_eq!(
        inbound
            .capture
            .as_ref()
            .unwrap()
            .ports
            .get(&8080)
            .map(String::as_str),
        Some("inbound-8080")
    );
}
