//! `weftctl inject`: a Kubernetes workload's manifest with the Weft sidecar added, as
//! `linkerd inject` and `istioctl kube-inject` do, offline (no cluster, no control service).
//!
//! Into each pod template (Pod, Deployment, StatefulSet, DaemonSet, ReplicaSet, Job,
//! CronJob) it adds, in order:
//!
//! - `weft-init`, an init container (root, `NET_ADMIN` and `NET_RAW` only) running
//!   `weft-proxy init`: the capture rules in the pod's network namespace;
//! - `weft-proxy`, a *native sidecar* (an init container with `restartPolicy: Always`): the
//!   app containers start only once its startup probe (`/ready` on the admin port) passes,
//!   and a Job completes when its own containers do (the two oldest complaints about sidecar
//!   meshes). Non-root (65532), read-only root filesystem, no capabilities, resource
//!   requests, probes on the admin port;
//! - the volumes it reads: its config (a ConfigMap made here, `weft-sidecar-<workload>`, with
//!   an inbound cluster per container port), the mesh's CA bundle (ConfigMap `weft-ca`),
//!   its join token (Secret `weft-token-<service account>`, a reusable token), and an
//!   `emptyDir` for its state.
//!
//! Other documents pass through unchanged; a template that already has `weft-proxy`, or
//! says `weft.dev/inject: "false"`, too. Comments in the input are not kept.

use std::collections::BTreeSet;

use serde::Deserialize;
use serde_yaml_ng::{Mapping, Value};

/// What the injected containers use.
#[derive(Clone, Debug)]
pub struct InjectOptions {
    /// The sidecar's image.
    pub proxy_image: String,
    /// The capture init container's image.
    pub init_image: String,
    /// The control service the sidecars follow.
    pub control: String,
}

impl Default for InjectOptions {
    fn default() -> Self {
        let version = env!("CARGO_PKG_VERSION");
        Self {
            proxy_image: format!("weft-proxy:{version}"),
            init_image: format!("weft-init:{version}"),
            control: "https://weft-control.weft-system.svc:7070".into(),
        }
    }
}

/// The proxy's user (the image's).
const PROXY_UID: i64 = 65532;
/// The admin port (probes, metrics), never captured.
const ADMIN_PORT: u16 = 15000;

fn s(v: &str) -> Value {
    Value::String(v.to_owned())
}

fn yaml(text: &str) -> Value {
    serde_yaml_ng::from_str(text).expect("a static YAML fragment")
}

fn get<'a>(v: &'a Value, path: &[&str]) -> Option<&'a Value> {
    path.iter().try_fold(v, |v, k| v.get(*k))
}

fn get_mut<'a>(v: &'a mut Value, path: &[&str]) -> Option<&'a mut Value> {
    path.iter().try_fold(v, |v, k| v.get_mut(*k))
}

/// `v[key]` as a mapping, made (empty) when missing; `Err` when it is something else.
fn mapping_at<'a>(v: &'a mut Value, key: &str, at: &str) -> Result<&'a mut Mapping, String> {
    let m = v
        .as_mapping_mut()
        .ok_or_else(|| format!("{at} is not a mapping"))?;
    let entry = m
        .entry(s(key))
        .or_insert_with(|| Value::Mapping(Mapping::new()));
    if entry.is_null() {
        *entry = Value::Mapping(Mapping::new());
    }
    entry
        .as_mapping_mut()
        .ok_or_else(|| format!("{at}.{key} is not a mapping"))
}

/// `v[key]` as a sequence, made (empty) when missing.
fn sequence_at<'a>(v: &'a mut Value, key: &str, at: &str) -> Result<&'a mut Vec<Value>, String> {
    let m = v
        .as_mapping_mut()
        .ok_or_else(|| format!("{at} is not a mapping"))?;
    let entry = m.entry(s(key)).or_insert_with(|| Value::Sequence(vec![]));
    if entry.is_null() {
        *entry = Value::Sequence(vec![]);
    }
    entry
        .as_sequence_mut()
        .ok_or_else(|| format!("{at}.{key} is not a list"))
}

/// Where a kind keeps its pod template.
fn template_path(kind: &str) -> Option<&'static [&'static str]> {
    Some(match kind {
        "Pod" => &[],
        "Deployment" | "StatefulSet" | "DaemonSet" | "ReplicaSet" | "Job" => &["spec", "template"],
        "CronJob" => &["spec", "jobTemplate", "spec", "template"],
        _ => return None,
    })
}

/// The manifest `input` (YAML documents) with the sidecar injected into every workload, and
/// a sidecar ConfigMap after each; `Err` names the document and what is wrong with it.
pub fn inject(input: &str, o: &InjectOptions) -> Result<String, String> {
    let mut out = Vec::new();
    for (i, document) in serde_yaml_ng::Deserializer::from_str(input).enumerate() {
        let mut doc = Value::deserialize(document)
            .map_err(|e| format!("document {}: not YAML: {e}", i + 1))?;
        if doc.is_null() {
            continue;
        }
        let kind = get(&doc, &["kind"])
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let name = get(&doc, &["metadata", "name"])
            .and_then(Value::as_str)
            .unwrap_or("")
            .to_owned();
        let at = format!("document {} ({kind} {name})", i + 1);
        let extra = match template_path(&kind) {
            Some(path) => {
                if name.is_empty() {
                    return Err(format!("{at}: metadata.name is needed"));
                }
                let namespace = get(&doc, &["metadata", "namespace"])
                    .and_then(Value::as_str)
                    .map(str::to_owned);
                let template = get_mut(&mut doc, path)
                    .ok_or_else(|| format!("{at}: no pod template at {}", path.join(".")))?;
                inject_pod(template, &kind, &name, namespace.as_deref(), o)
                    .map_err(|e| format!("{at}: {e}"))?
            }
            None => None,
        };
        out.push(doc);
        out.extend(extra);
    }
    let mut text = String::new();
    for (i, doc) in out.iter().enumerate() {
        if i > 0 {
            text.push_str("---\n");
        }
        text.push_str(&serde_yaml_ng::to_string(doc).map_err(|e| e.to_string())?);
    }
    Ok(text)
}

/// Injects into one pod template; returns the sidecar's ConfigMap, or `None` when the
/// template is left alone.
fn inject_pod(
    template: &mut Value,
    kind: &str,
    workload: &str,
    namespace: Option<&str>,
    o: &InjectOptions,
) -> Result<Option<Value>, String> {
    let annotations = get(template, &["metadata", "annotations"]);
    if annotations
        .and_then(|a| a.get("weft.dev/inject"))
        .and_then(Value::as_str)
        == Some("false")
    {
        return Ok(None);
    }
    let spec = get(template, &["spec"]).ok_or("the pod template has no spec")?;
    let names = |list: &str| -> Vec<String> {
        spec.get(list)
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
            .filter_map(|c| c.get("name").and_then(Value::as_str).map(str::to_owned))
            .collect()
    };
    if names("containers")
        .iter()
        .chain(&names("initContainers"))
        .any(|n| n == "weft-proxy")
    {
        return Ok(None);
    }
    if spec.get("hostNetwork").and_then(Value::as_bool) == Some(true) {
        // Its capture rules would go into the node's own network namespace.
        return Err(
            "a pod on the host's network (hostNetwork: true) cannot have a sidecar; \
                    annotate it weft.dev/inject: \"false\""
                .into(),
        );
    }
    let containers = spec
        .get("containers")
        .and_then(Value::as_sequence)
        .filter(|c| !c.is_empty())
        .ok_or("the pod template has no containers")?;
    // An app running as the proxy's user would have its traffic left alone by the rules.
    let pod_user = get(spec, &["securityContext", "runAsUser"]).and_then(Value::as_i64);
    for c in containers.iter().chain(
        spec.get("initContainers")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten(),
    ) {
        let user = get(c, &["securityContext", "runAsUser"])
            .and_then(Value::as_i64)
            .or(pod_user);
        if user == Some(PROXY_UID) {
            let name = c.get("name").and_then(Value::as_str).unwrap_or("?");
            return Err(format!(
                "container `{name}` runs as uid {PROXY_UID}, the proxy's: its traffic would not be captured"
            ));
        }
    }
    // The app's TCP ports: each becomes an inbound cluster to 127.0.0.1:<port>.
    let mut ports = BTreeSet::new();
    for c in containers {
        for p in c
            .get("ports")
            .and_then(Value::as_sequence)
            .into_iter()
            .flatten()
        {
            let tcp = p
                .get("protocol")
                .and_then(Value::as_str)
                .is_none_or(|proto| proto == "TCP");
            if let Some(port) = p.get("containerPort").and_then(Value::as_u64)
                && tcp
            {
                let port = u16::try_from(port).map_err(|_| format!("containerPort {port}"))?;
                if port == ADMIN_PORT || port == 15001 || port == 15006 {
                    return Err(format!(
                        "containerPort {port} is one of the sidecar's ports"
                    ));
                }
                ports.insert(port);
            }
        }
    }
    let labels = get(template, &["metadata", "labels"]);
    let label = |k: &str| labels.and_then(|l| l.get(k)).and_then(Value::as_str);
    let app = label("app")
        .or_else(|| label("app.kubernetes.io/name"))
        .unwrap_or(workload)
        .to_owned();
    let account = spec
        .get("serviceAccountName")
        .and_then(Value::as_str)
        .unwrap_or("default")
        .to_owned();
    let config_map = format!("weft-sidecar-{workload}");

    let metadata = mapping_at(template, "metadata", "the pod template")?;
    let annotations = metadata
        .entry(s("annotations"))
        .or_insert_with(|| Value::Mapping(Mapping::new()));
    if annotations.is_null() {
        *annotations = Value::Mapping(Mapping::new());
    }
    let annotations = annotations
        .as_mapping_mut()
        .ok_or("metadata.annotations is not a mapping")?;
    annotations.insert(s("weft.dev/proxy-image"), s(&o.proxy_image));

    let spec = template.get_mut("spec").expect("checked above");
    let init = init_container(o);
    let proxy = proxy_container(o, &app);
    let inits = sequence_at(spec, "initContainers", "spec")?;
    // Capture first, then the sidecar: both before the app's own init containers, so that
    // those are captured and can reach the mesh.
    inits.insert(0, proxy);
    inits.insert(0, init);
    let volumes = sequence_at(spec, "volumes", "spec")?;
    volumes.push(yaml(&format!(
        "{{ name: weft-config, configMap: {{ name: {config_map} }} }}"
    )));
    volumes.push(yaml("{ name: weft-ca, configMap: { name: weft-ca } }"));
    volumes.push(yaml(&format!(
        "{{ name: weft-token, secret: {{ secretName: weft-token-{account} }} }}"
    )));
    volumes.push(yaml("{ name: weft-state, emptyDir: {} }"));

    let mut cm = yaml(&format!(
        "apiVersion: v1\nkind: ConfigMap\nmetadata:\n  name: {config_map}\n  labels: {{ app.kubernetes.io/part-of: weft }}\n  annotations: {{ weft.dev/for: \"{kind}/{workload}\" }}\n"
    ));
    if let Some(ns) = namespace {
        mapping_at(&mut cm, "metadata", "ConfigMap")?.insert(s("namespace"), s(ns));
    }
    let mut data = Mapping::new();
    data.insert(s("proxy.yaml"), s(&sidecar_config(&ports)));
    cm.as_mapping_mut()
        .expect("a mapping")
        .insert(s("data"), Value::Mapping(data));
    Ok(Some(cm))
}

fn init_container(o: &InjectOptions) -> Value {
    yaml(&format!(
        r#"
name: weft-init
image: "{image}"
args: ["--proxy-uid", "{PROXY_UID}", "--exclude-inbound-ports", "{ADMIN_PORT}"]
securityContext:
  runAsUser: 0
  runAsNonRoot: false
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities: {{ add: [NET_ADMIN, NET_RAW], drop: [ALL] }}
resources:
  requests: {{ cpu: 10m, memory: 16Mi }}
  limits: {{ memory: 64Mi }}
"#,
        image = o.init_image
    ))
}

fn proxy_container(o: &InjectOptions, app: &str) -> Value {
    yaml(&format!(
        r#"
name: weft-proxy
image: "{image}"
restartPolicy: Always
args:
  - --config
  - /etc/weft/config/proxy.yaml
  - --control
  - "{control}"
  - --control-ca-file
  - /etc/weft/ca/bundle.pem
  - --id
  - $(POD_NAME)
  - --label
  - "app={app}"
env:
  - name: POD_NAME
    valueFrom: {{ fieldRef: {{ fieldPath: metadata.name }} }}
ports:
  - {{ name: weft-admin, containerPort: {ADMIN_PORT} }}
startupProbe:
  httpGet: {{ path: /ready, port: {ADMIN_PORT} }}
  periodSeconds: 1
  failureThreshold: 120
readinessProbe:
  httpGet: {{ path: /ready, port: {ADMIN_PORT} }}
  periodSeconds: 5
resources:
  requests: {{ cpu: 50m, memory: 64Mi }}
  limits: {{ memory: 256Mi }}
securityContext:
  runAsUser: {PROXY_UID}
  runAsGroup: {PROXY_UID}
  runAsNonRoot: true
  allowPrivilegeEscalation: false
  readOnlyRootFilesystem: true
  capabilities: {{ drop: [ALL] }}
volumeMounts:
  - {{ name: weft-config, mountPath: /etc/weft/config, readOnly: true }}
  - {{ name: weft-ca, mountPath: /etc/weft/ca, readOnly: true }}
  - {{ name: weft-token, mountPath: /var/run/weft/token, readOnly: true }}
  - {{ name: weft-state, mountPath: /var/lib/weft }}
"#,
        image = o.proxy_image,
        control = o.control,
    ))
}

/// The sidecar's config: capture both ways, mesh mTLS in (permissive), each app port an
/// inbound cluster.
fn sidecar_config(ports: &BTreeSet<u16>) -> String {
    let mut text = String::from(
        "# Made by weftctl inject: transparent capture both ways; chains and services come\n\
         # from the control service.\n\
         identity:\n  token_file: /var/run/weft/token/token\n\
         admin:\n  address: 0.0.0.0:15000\n\
         listeners:\n  - name: outbound\n    address: 0.0.0.0:15001\n    direction: outbound\n    capture: {}\n\
         \x20 - name: inbound\n    address: 0.0.0.0:15006\n    direction: inbound\n    tls: { mode: permissive }\n",
    );
    if ports.is_empty() {
        text.push_str("    capture: {}\nclusters: []\n");
        return text;
    }
    let map: Vec<String> = ports.iter().map(|p| format!("{p}: inbound-{p}")).collect();
    text.push_str(&format!(
        "    capture: {{ ports: {{ {} }} }}\nclusters:\n",
        map.join(", ")
    ));
    for p in ports {
        text.push_str(&format!(
            "  - name: inbound-{p}\n    endpoints: [ {{ address: \"127.0.0.1:{p}\" }} ]\n    outlier: {{ consecutive_failures: 0 }}\n"
        ));
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_sidecar_config_is_a_valid_proxy_config() {
        let text = sidecar_config(&BTreeSet::from([8080, 9090]));
        let config: weft_config::Config = serde_yaml_ng::from_str(&text).unwrap();
        config.validate().unwrap();
        let capture = config.listeners[1].capture.as_ref().unwrap();
        assert_eq!(
            capture.ports.get(&8080).map(String::as_str),
            Some("inbound-8080")
        );
        let empty: weft_config::Config =
            serde_yaml_ng::from_str(&sidecar_config(&BTreeSet::new())).unwrap();
        empty.validate().unwrap();
    }

    #[test]
    fn injecting_twice_changes_nothing_and_opted_out_templates_are_left_alone() {
        let input = "apiVersion: v1\nkind: Pod\nmetadata: { name: p }\nspec:\n  containers: [ { name: app, image: app } ]\n";
        let once = inject(input, &InjectOptions::default()).unwrap();
        let pod_only = once.split("---\n").next().unwrap();
        let twice = inject(pod_only, &InjectOptions::default()).unwrap();
        assert_eq!(twice, pod_only, "already injected: unchanged");
        let opted_out = input.replace(
            "metadata: { name: p }",
            "metadata: { name: p, annotations: { weft.dev/inject: \"false\" } }",
        );
        let out = inject(&opted_out, &InjectOptions::default()).unwrap();
        assert!(!out.contains("weft-proxy"), "{out}");
    }

    #[test]
    fn what_cannot_be_injected_is_named() {
        let e = inject(
            "kind: Deployment\nmetadata: { name: d }\nspec: {}\n",
            &InjectOptions::default(),
        )
        .unwrap_err();
        assert!(
            e.contains("document 1 (Deployment d): no pod template at spec.template"),
            "{e}"
        );
        let e = inject(
            "kind: Pod\nmetadata: { name: p }\nspec:\n  containers: [ { name: a, image: a, ports: [ { containerPort: 15001 } ] } ]\n",
            &InjectOptions::default(),
        )
        .unwrap_err();
        assert!(
            e.contains("containerPort 15001 is one of the sidecar's ports"),
            "{e}"
        );
        let e = inject(
            "kind: Pod\nmetadata: { name: p }\nspec:\n  hostNetwork: true\n  containers: [ { name: a, image: a } ]\n",
            &InjectOptions::default(),
        )
        .unwrap_err();
        assert!(e.contains("hostNetwork: true"), "{e}");
        let e = inject(
            "kind: Pod\nmetadata: { name: p }\nspec:\n  securityContext: { runAsUser: 65532 }\n  containers: [ { name: a, image: a } ]\n",
            &InjectOptions::default(),
        )
        .unwrap_err();
        assert!(e.contains("container `a` runs as uid 65532"), "{e}");
    }
}
