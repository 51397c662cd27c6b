//! Workloads without a kubelet: a Node object, Pods bound to it, and their status patched to
//! Ready (or not) with an IP, so that kube-controller-manager's real EndpointSlice controller
//! writes the EndpointSlices exactly as it would in a cluster.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use k8s_openapi::api::core::v1::{Node, Pod, Service};
use kube::api::{Api, Patch, PatchParams, PostParams};
use serde_json::json;

/// Creates (or finds) a Node named `name` whose status is Ready.
pub async fn ensure_node(client: &kube::Client, name: &str) -> Result<()> {
    let nodes: Api<Node> = Api::all(client.clone());
    if nodes.get_opt(name).await?.is_none() {
        let node: Node = serde_json::from_value(json!({
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": name, "labels": {"kubernetes.io/hostname": name}},
        }))?;
        nodes
            .create(&PostParams::default(), &node)
            .await
            .with_context(|| format!("creating node {name}"))?;
    }
    let status = json!({"status": {"conditions": [{
        "type": "Ready", "status": "True", "reason": "KubeletReady",
        "message": "localenv node", "lastHeartbeatTime": now(), "lastTransitionTime": now(),
    }]}});
    nodes
        .patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .with_context(|| format!("marking node {name} ready"))?;
    Ok(())
}

/// Creates a Service selecting `app=<name>` with one TCP port `port` named `http` (target
/// port the same number).
pub async fn create_service(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    port: u16,
    annotations: BTreeMap<String, String>,
) -> Result<Service> {
    let svc: Service = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "annotations": annotations},
        "spec": {
            "selector": {"app": name},
            "ports": [{"name": "http", "port": port, "targetPort": port, "protocol": "TCP"}],
        },
    }))?;
    Api::<Service>::namespaced(client.clone(), namespace)
        .create(&PostParams::default(), &svc)
        .await
        .with_context(|| format!("creating service {namespace}/{name}"))
}

/// A Pod as a test wants it: labelled `app=<app>`, bound to `node`, listening on `port`, with
/// IP `ip` and the given readiness.
#[derive(Clone, Copy, Debug)]
pub struct PodSpec<'a> {
    pub name: &'a str,
    pub app: &'a str,
    pub node: &'a str,
    pub ip: &'a str,
    pub port: u16,
    pub ready: bool,
}

/// Creates the Pod, then sets its status to Running with its IP and readiness.
pub async fn create_pod(client: &kube::Client, namespace: &str, p: &PodSpec<'_>) -> Result<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": p.name, "namespace": namespace, "labels": {"app": p.app}},
        "spec": {
            "nodeName": p.node,
            "containers": [{
                "name": "app",
                "image": "registry.invalid/app:1",
                "ports": [{"name": "http", "containerPort": p.port, "protocol": "TCP"}],
            }],
        },
    }))?;
    pods.create(&PostParams::default(), &pod)
        .await
        .with_context(|| format!("creating pod {namespace}/{}", p.name))?;
    set_pod_status(client, namespace, p.name, p.ip, p.ready).await
}

/// Patches a Pod's status: Running, IP `ip`, condition Ready = `ready`.
pub async fn set_pod_status(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    ip: &str,
    ready: bool,
) -> Result<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let flag = if ready { "True" } else { "False" };
    let status = json!({"status": {
        "phase": "Running",
        "hostIP": "127.0.0.1",
        "podIP": ip,
        "podIPs": [{"ip": ip}],
        "startTime": now(),
        "conditions": [
            {"type": "PodScheduled", "status": "True", "lastTransitionTime": now()},
            {"type": "Initialized", "status": "True", "lastTransitionTime": now()},
            {"type": "ContainersReady", "status": flag, "lastTransitionTime": now()},
            {"type": "Ready", "status": flag, "lastTransitionTime": now()},
        ],
    }});
    pods.patch_status(name, &PatchParams::default(), &Patch::Merge(&status))
        .await
        .with_context(|| format!("setting status of pod {namespace}/{name}"))
}

/// Flips only the Ready condition of a running Pod.
pub async fn set_pod_ready(
    client: &kube::Client,
    namespace: &str,
    name: &str,
    ready: bool,
) -> Result<Pod> {
    let pods: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let pod = pods.get(name).await?;
    let ip = pod
        .status
        .as_ref()
        .and_then(|s| s.pod_ip.clone())
        .with_context(|| format!("pod {namespace}/{name} has no IP yet"))?;
    set_pod_status(client, namespace, name, &ip, ready).await
}

fn now() -> String {
    k8s_openapi::jiff::Timestamp::now()
        .strftime("%Y-%m-%dT%H:%M:%SZ")
        .to_string()
}
