//! Kubernetes objects → target groups, with the `__address__` and `__meta_kubernetes_*`
//! labels Prometheus gives each role (`node`, `pod`, `service`, `ingress` here; `endpoints`
//! and `endpointslice` in `endpoints.rs`). Pure functions: an object (and, for the roles
//! that need them, the Services and Pods it refers to) in, a group out.

use k8s_openapi::api::core::v1::{Container, ContainerStatus, Node, Pod, Service};
use k8s_openapi::api::networking::v1::{Ingress, IngressRule};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use sonde_proto::config::Labels;
use std::collections::BTreeMap;

pub use crate::targets::ADDRESS_LABEL as ADDRESS;
use crate::targets::Group;
pub const INSTANCE: &str = "instance";
pub(super) const META: &str = "__meta_kubernetes_";
pub(super) const NAMESPACE: &str = "__meta_kubernetes_namespace";

/// An empty group named `source` (`svc/default/web`, as Prometheus names its groups).
fn empty_group(source: String) -> Group {
    Group {
        source,
        ..Default::default()
    }
}

/// Prometheus's `strutil.SanitizeLabelName`: every character outside `[a-zA-Z0-9_]`
/// becomes `_` (`app.kubernetes.io/name` → `app_kubernetes_io_name`).
pub fn sanitize_label_name(name: &str) -> String {
    name.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// Go's `net.JoinHostPort`: an IPv6 address is bracketed.
pub(super) fn join_host_port(host: &str, port: impl std::fmt::Display) -> String {
    if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    }
}

pub(super) fn put(labels: &mut Labels, name: &str, value: impl Into<String>) {
    labels.insert(name.to_string(), value.into());
}

fn text(value: &Option<String>) -> &str {
    value.as_deref().unwrap_or("")
}

pub(super) fn name_of(meta: &ObjectMeta) -> &str {
    text(&meta.name)
}

pub(super) fn namespace_of(meta: &ObjectMeta) -> &str {
    text(&meta.namespace)
}

/// `__meta_kubernetes_<resource>_label_<name>` and `_labelpresent_`, and the same for
/// annotations.
pub(super) fn add_labels_and_annotations(labels: &mut Labels, meta: &ObjectMeta, resource: &str) {
    for (kind, map) in [("label", &meta.labels), ("annotation", &meta.annotations)] {
        for (k, v) in map.iter().flatten() {
            let name = sanitize_label_name(k);
            labels.insert(format!("{META}{resource}_{kind}_{name}"), v.clone());
            labels.insert(
                format!("{META}{resource}_{kind}present_{name}"),
                "true".into(),
            );
        }
    }
}

/// `__meta_kubernetes_<role>_name` and the object's labels and annotations.
pub(super) fn add_object_meta(labels: &mut Labels, meta: &ObjectMeta, role: &str) {
    labels.insert(format!("{META}{role}_name"), name_of(meta).to_string());
    add_labels_and_annotations(labels, meta, role);
}

// ---- service ----

/// The labels every target of a Service carries (also given to the targets of its
/// Endpoints and EndpointSlices).
pub(super) fn service_labels(svc: &Service) -> Labels {
    let mut labels = Labels::new();
    put(&mut labels, NAMESPACE, namespace_of(&svc.metadata));
    add_object_meta(&mut labels, &svc.metadata, "service");
    labels
}

/// One target per port, at `<name>.<namespace>.svc:<port>`.
pub fn service_group(svc: &Service) -> Group {
    let (ns, name) = (namespace_of(&svc.metadata), name_of(&svc.metadata));
    let mut group = empty_group(format!("svc/{ns}/{name}"));
    group.labels = service_labels(svc);
    let Some(spec) = &svc.spec else {
        return group;
    };
    let kind = text(&spec.type_);
    for port in spec.ports.iter().flatten() {
        let mut t = Labels::new();
        put(
            &mut t,
            ADDRESS,
            join_host_port(&format!("{name}.{ns}.svc"), port.port),
        );
        put(
            &mut t,
            "__meta_kubernetes_service_port_name",
            text(&port.name),
        );
        put(
            &mut t,
            "__meta_kubernetes_service_port_number",
            port.port.to_string(),
        );
        put(
            &mut t,
            "__meta_kubernetes_service_port_protocol",
            text(&port.protocol),
        );
        put(&mut t, "__meta_kubernetes_service_type", kind);
        if kind == "ExternalName" {
            put(
                &mut t,
                "__meta_kubernetes_service_external_name",
                text(&spec.external_name),
            );
        } else {
            put(
                &mut t,
                "__meta_kubernetes_service_cluster_ip",
                text(&spec.cluster_ip),
            );
        }
        if kind == "LoadBalancer" {
            put(
                &mut t,
                "__meta_kubernetes_service_loadbalancer_ip",
                load_balancer_ips(svc),
            );
        }
        group.targets.push(t);
    }
    group
}

/// The load balancer's addresses from the status, else the one asked for in the spec.
fn load_balancer_ips(svc: &Service) -> String {
    let ips: Vec<&str> = svc
        .status
        .iter()
        .filter_map(|s| s.load_balancer.as_ref())
        .flat_map(|lb| lb.ingress.iter().flatten())
        .filter_map(|i| i.ip.as_deref().filter(|ip| !ip.is_empty()))
        .collect();
    if ips.is_empty() {
        svc.spec
            .as_ref()
            .map(|s| text(&s.load_balancer_ip))
            .unwrap_or("")
            .to_string()
    } else {
        ips.join(",")
    }
}

// ---- ingress ----

/// One target per rule and path, at the rule's host; `__meta_kubernetes_ingress_scheme`
/// is `https` when a TLS entry covers the host.
pub fn ingress_group(ingress: &Ingress) -> Group {
    let meta = &ingress.metadata;
    let mut group = empty_group(format!("ingress/{}/{}", namespace_of(meta), name_of(meta)));
    put(&mut group.labels, NAMESPACE, namespace_of(meta));
    let spec = ingress.spec.as_ref();
    if let Some(class) = spec.and_then(|s| s.ingress_class_name.as_deref()) {
        put(
            &mut group.labels,
            "__meta_kubernetes_ingress_class_name",
            class,
        );
    }
    add_object_meta(&mut group.labels, meta, "ingress");
    let Some(spec) = spec else {
        return group;
    };
    let tls_hosts: Vec<&str> = spec
        .tls
        .iter()
        .flatten()
        .flat_map(|t| t.hosts.iter().flatten())
        .map(String::as_str)
        .collect();
    for rule in spec.rules.iter().flatten() {
        let host = text(&rule.host);
        let scheme = if tls_hosts.iter().any(|p| matches_host_pattern(p, host)) {
            "https"
        } else {
            "http"
        };
        for path in rule_paths(rule) {
            let mut t = Labels::new();
            put(&mut t, ADDRESS, host);
            put(&mut t, "__meta_kubernetes_ingress_scheme", scheme);
            put(&mut t, "__meta_kubernetes_ingress_host", host);
            put(&mut t, "__meta_kubernetes_ingress_path", path);
            group.targets.push(t);
        }
    }
    group
}

/// A rule without `http` is the root path; each path of an `http` rule, `/` for an empty
/// one (an `http` rule with no paths has no targets, as in Prometheus).
fn rule_paths(rule: &IngressRule) -> Vec<&str> {
    match &rule.http {
        None => vec!["/"],
        Some(http) => http
            .paths
            .iter()
            .map(|p| p.path.as_deref().filter(|p| !p.is_empty()).unwrap_or("/"))
            .collect(),
    }
}

/// `host` equals `pattern`, or `pattern` is `*.rest` and `host` is one label followed by
/// the same `rest`.
fn matches_host_pattern(pattern: &str, host: &str) -> bool {
    if pattern == host {
        return true;
    }
    let pattern: Vec<&str> = pattern.split('.').collect();
    let host: Vec<&str> = host.split('.').collect();
    pattern[0] == "*" && pattern.len() == host.len() && pattern[1..] == host[1..]
}

// ---- pod ----

/// The labels a Pod gives its targets (without the namespace, which the group carries).
pub(super) fn pod_labels(pod: &Pod) -> Labels {
    let status = pod.status.as_ref();
    let mut labels = Labels::new();
    put(
        &mut labels,
        "__meta_kubernetes_pod_ip",
        status.map_or("", |s| text(&s.pod_ip)),
    );
    put(&mut labels, "__meta_kubernetes_pod_ready", pod_ready(pod));
    put(
        &mut labels,
        "__meta_kubernetes_pod_phase",
        status.map_or("", |s| text(&s.phase)),
    );
    put(
        &mut labels,
        "__meta_kubernetes_pod_node_name",
        pod.spec.as_ref().map_or("", |s| text(&s.node_name)),
    );
    put(
        &mut labels,
        "__meta_kubernetes_pod_host_ip",
        status.map_or("", |s| text(&s.host_ip)),
    );
    put(
        &mut labels,
        "__meta_kubernetes_pod_uid",
        text(&pod.metadata.uid),
    );
    add_object_meta(&mut labels, &pod.metadata, "pod");
    let controller = pod
        .metadata
        .owner_references
        .iter()
        .flatten()
        .find(|r| r.controller == Some(true));
    if let Some(owner) = controller {
        if !owner.kind.is_empty() {
            put(
                &mut labels,
                "__meta_kubernetes_pod_controller_kind",
                owner.kind.as_str(),
            );
        }
        if !owner.name.is_empty() {
            put(
                &mut labels,
                "__meta_kubernetes_pod_controller_name",
                owner.name.as_str(),
            );
        }
    }
    labels
}

/// The status of the `Ready` condition, lowercased; `unknown` without one.
fn pod_ready(pod: &Pod) -> String {
    pod.status
        .iter()
        .flat_map(|s| s.conditions.iter().flatten())
        .find(|c| c.type_ == "Ready")
        .map_or_else(|| "unknown".to_string(), |c| c.status.to_lowercase())
}

pub(super) fn pod_ip(pod: &Pod) -> &str {
    pod.status.as_ref().map_or("", |s| text(&s.pod_ip))
}

/// The Pod's containers, then its init containers, each with whether it is one.
pub(super) fn containers(pod: &Pod) -> impl Iterator<Item = (&Container, bool)> {
    let spec = pod.spec.as_ref();
    spec.into_iter()
        .flat_map(|s| s.containers.iter().map(|c| (c, false)))
        .chain(
            spec.into_iter()
                .flat_map(|s| s.init_containers.iter().flatten().map(|c| (c, true))),
        )
}

/// One target per declared container port at `<pod IP>:<port>`, and one at the bare Pod
/// IP for each container that declares none; nothing while the Pod has no IP.
pub fn pod_group(pod: &Pod) -> Group {
    let meta = &pod.metadata;
    let mut group = empty_group(format!("pod/{}/{}", namespace_of(meta), name_of(meta)));
    let ip = pod_ip(pod);
    if ip.is_empty() {
        return group;
    }
    group.labels = pod_labels(pod);
    put(&mut group.labels, NAMESPACE, namespace_of(meta));
    let status = pod.status.as_ref();
    for (c, init) in containers(pod) {
        let statuses = status.and_then(|s| {
            if init {
                s.init_container_statuses.as_ref()
            } else {
                s.container_statuses.as_ref()
            }
        });
        let id = container_id(statuses, &c.name);
        let mut base = Labels::new();
        put(
            &mut base,
            "__meta_kubernetes_pod_container_name",
            c.name.as_str(),
        );
        put(&mut base, "__meta_kubernetes_pod_container_id", id);
        put(
            &mut base,
            "__meta_kubernetes_pod_container_image",
            text(&c.image),
        );
        put(
            &mut base,
            "__meta_kubernetes_pod_container_init",
            init.to_string(),
        );
        let ports = c.ports.as_deref().unwrap_or_default();
        if ports.is_empty() {
            let mut t = base;
            put(&mut t, ADDRESS, ip);
            group.targets.push(t);
            continue;
        }
        for port in ports {
            let mut t = base.clone();
            put(&mut t, ADDRESS, join_host_port(ip, port.container_port));
            put(
                &mut t,
                "__meta_kubernetes_pod_container_port_number",
                port.container_port.to_string(),
            );
            put(
                &mut t,
                "__meta_kubernetes_pod_container_port_name",
                text(&port.name),
            );
            put(
                &mut t,
                "__meta_kubernetes_pod_container_port_protocol",
                text(&port.protocol),
            );
            group.targets.push(t);
        }
    }
    group
}

fn container_id<'a>(statuses: Option<&'a Vec<ContainerStatus>>, name: &str) -> &'a str {
    statuses
        .into_iter()
        .flatten()
        .find(|s| s.name == name)
        .map_or("", |s| text(&s.container_id))
}

// ---- node ----

/// One target at the Node's address (InternalIP first, as Prometheus orders them) and
/// kubelet port, with `instance` set to the Node's name; `None` for a Node without an
/// address.
pub fn node_group(node: &Node) -> Option<Group> {
    let meta = &node.metadata;
    let mut group = empty_group(format!("node/{}", name_of(meta)));
    put(
        &mut group.labels,
        "__meta_kubernetes_node_provider_id",
        node.spec.as_ref().map_or("", |s| text(&s.provider_id)),
    );
    let status = node.status.as_ref();
    for c in status.iter().flat_map(|s| s.conditions.iter().flatten()) {
        let name = sanitize_label_name(&c.type_.to_lowercase());
        group.labels.insert(
            format!("{META}node_condition_{name}"),
            c.status.to_lowercase(),
        );
    }
    add_object_meta(&mut group.labels, meta, "node");

    let mut by_type: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for a in status.iter().flat_map(|s| s.addresses.iter().flatten()) {
        by_type
            .entry(a.type_.as_str())
            .or_default()
            .push(a.address.as_str());
    }
    let order = [
        "InternalIP",
        "InternalDNS",
        "ExternalIP",
        "ExternalDNS",
        "LegacyHostIP",
        "Hostname",
    ];
    let address = order.iter().find_map(|t| by_type.get(t).map(|a| a[0]))?;
    let port = status
        .and_then(|s| s.daemon_endpoints.as_ref())
        .and_then(|d| d.kubelet_endpoint.as_ref())
        .map_or(0, |k| k.port);
    let mut t = Labels::new();
    put(&mut t, ADDRESS, join_host_port(address, port));
    put(&mut t, INSTANCE, name_of(meta));
    for (kind, addresses) in &by_type {
        t.insert(
            sanitize_label_name(&format!("{META}node_address_{kind}")),
            addresses[0].to_string(),
        );
    }
    group.targets.push(t);
    Some(group)
}
