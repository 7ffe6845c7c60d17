//! The `endpoints` and `endpointslice` roles: one target per address and port of an
//! Endpoints (or EndpointSlice) object, with the labels of the Service it belongs to and
//! of the Pod behind each address, plus a target for every other declared port of those
//! Pods, as Prometheus builds them.

use super::groups::{
    ADDRESS, META, NAMESPACE, add_object_meta, containers, join_host_port, name_of, namespace_of,
    pod_ip, pod_labels, put, sanitize_label_name, service_labels,
};
use crate::targets::Group;
use k8s_openapi::api::core::v1::{
    EndpointAddress, EndpointPort, Endpoints, ObjectReference, Pod, Service,
};
use k8s_openapi::api::discovery::v1::{Endpoint, EndpointPort as SlicePort, EndpointSlice};
use sonde_proto::config::Labels;

/// Finds the Services and Pods an endpoints object refers to, by namespace and name.
pub trait Lookup {
    fn service(&self, namespace: &str, name: &str) -> Option<&Service>;
    fn pod(&self, namespace: &str, name: &str) -> Option<&Pod>;
}

/// The Pod a target reference names, when it names a Pod that is known.
fn referenced_pod<'a>(
    lookup: &'a impl Lookup,
    target: Option<&ObjectReference>,
) -> Option<&'a Pod> {
    let r = target?;
    if r.kind.as_deref() != Some("Pod") {
        return None;
    }
    lookup.pod(
        r.namespace.as_deref().unwrap_or(""),
        r.name.as_deref().unwrap_or(""),
    )
}

/// Pods met while walking the addresses, in the order met, with the ports already
/// turned into targets.
#[derive(Default)]
struct SeenPods<'a> {
    pods: Vec<(&'a Pod, Vec<i32>)>,
}

impl<'a> SeenPods<'a> {
    fn note(&mut self, pod: &'a Pod, port: Option<i32>) {
        let i = match self.pods.iter().position(|(p, _)| std::ptr::eq(*p, pod)) {
            Some(i) => i,
            None => {
                self.pods.push((pod, Vec::new()));
                self.pods.len() - 1
            }
        };
        if let Some(port) = port {
            self.pods[i].1.push(port);
        }
    }

    /// A target for each container port of each Pod that no endpoint port covered.
    fn remaining_ports(self, group: &mut Group) {
        for (pod, seen) in self.pods {
            let ip = pod_ip(pod);
            if ip.is_empty() {
                continue;
            }
            for (c, init) in containers(pod) {
                for cport in c.ports.iter().flatten() {
                    if seen.contains(&cport.container_port) {
                        continue;
                    }
                    let mut t = pod_labels(pod);
                    put(&mut t, ADDRESS, join_host_port(ip, cport.container_port));
                    put(
                        &mut t,
                        "__meta_kubernetes_pod_container_name",
                        c.name.as_str(),
                    );
                    put(
                        &mut t,
                        "__meta_kubernetes_pod_container_image",
                        c.image.as_deref().unwrap_or(""),
                    );
                    put(
                        &mut t,
                        "__meta_kubernetes_pod_container_port_name",
                        cport.name.as_deref().unwrap_or(""),
                    );
                    put(
                        &mut t,
                        "__meta_kubernetes_pod_container_port_number",
                        cport.container_port.to_string(),
                    );
                    put(
                        &mut t,
                        "__meta_kubernetes_pod_container_port_protocol",
                        cport.protocol.as_deref().unwrap_or(""),
                    );
                    put(
                        &mut t,
                        "__meta_kubernetes_pod_container_init",
                        init.to_string(),
                    );
                    group.targets.push(t);
                }
            }
        }
    }
}

/// Adds the Pod's labels, and those of the container that declares `port`, to an
/// endpoint's target. The container port's protocol label is the endpoint port's
/// (`endpoint_protocol`) for the endpoints role and the container's own for the
/// endpointslice role, as in Prometheus.
fn add_pod_and_container(t: &mut Labels, pod: &Pod, port: i32, endpoint_protocol: Option<&str>) {
    t.extend(pod_labels(pod));
    let declared = containers(pod).find_map(|(c, init)| {
        c.ports
            .iter()
            .flatten()
            .find(|p| p.container_port == port)
            .map(|p| (c, init, p))
    });
    if let Some((c, init, cport)) = declared {
        put(t, "__meta_kubernetes_pod_container_name", c.name.as_str());
        put(
            t,
            "__meta_kubernetes_pod_container_image",
            c.image.as_deref().unwrap_or(""),
        );
        put(
            t,
            "__meta_kubernetes_pod_container_port_name",
            cport.name.as_deref().unwrap_or(""),
        );
        put(
            t,
            "__meta_kubernetes_pod_container_port_number",
            port.to_string(),
        );
        let protocol = endpoint_protocol.unwrap_or(cport.protocol.as_deref().unwrap_or(""));
        put(t, "__meta_kubernetes_pod_container_port_protocol", protocol);
        put(t, "__meta_kubernetes_pod_container_init", init.to_string());
    }
}

/// The `endpoints` role: one group per Endpoints object.
pub fn endpoints_group(eps: &Endpoints, lookup: &impl Lookup) -> Group {
    let (ns, name) = (namespace_of(&eps.metadata), name_of(&eps.metadata));
    let mut group = Group {
        source: format!("endpoints/{ns}/{name}"),
        ..Default::default()
    };
    put(&mut group.labels, NAMESPACE, ns);
    if let Some(svc) = lookup.service(ns, name) {
        group.labels.extend(service_labels(svc));
    }
    add_object_meta(&mut group.labels, &eps.metadata, "endpoints");

    let mut seen = SeenPods::default();
    let mut add = |addr: &EndpointAddress, port: &EndpointPort, ready: &str| {
        let protocol = port.protocol.as_deref().unwrap_or("");
        let mut t = Labels::new();
        put(&mut t, ADDRESS, join_host_port(&addr.ip, port.port));
        put(
            &mut t,
            "__meta_kubernetes_endpoint_port_name",
            port.name.as_deref().unwrap_or(""),
        );
        put(&mut t, "__meta_kubernetes_endpoint_port_protocol", protocol);
        put(&mut t, "__meta_kubernetes_endpoint_ready", ready);
        if let Some(r) = &addr.target_ref {
            put(
                &mut t,
                "__meta_kubernetes_endpoint_address_target_kind",
                r.kind.as_deref().unwrap_or(""),
            );
            put(
                &mut t,
                "__meta_kubernetes_endpoint_address_target_name",
                r.name.as_deref().unwrap_or(""),
            );
        }
        if let Some(node) = &addr.node_name {
            put(
                &mut t,
                "__meta_kubernetes_endpoint_node_name",
                node.as_str(),
            );
        }
        if let Some(host) = addr.hostname.as_deref().filter(|h| !h.is_empty()) {
            put(&mut t, "__meta_kubernetes_endpoint_hostname", host);
        }
        if let Some(pod) = referenced_pod(lookup, addr.target_ref.as_ref()) {
            seen.note(pod, Some(port.port));
            add_pod_and_container(&mut t, pod, port.port, Some(protocol));
        }
        group.targets.push(t);
    };
    for subset in eps.subsets.iter().flatten() {
        for port in subset.ports.iter().flatten() {
            for addr in subset.addresses.iter().flatten() {
                add(addr, port, "true");
            }
            for addr in subset.not_ready_addresses.iter().flatten() {
                add(addr, port, "false");
            }
        }
    }
    seen.remaining_ports(&mut group);
    group
}

/// The `endpointslice` role: one group per EndpointSlice; its Service is the one named
/// by its `kubernetes.io/service-name` label.
pub fn endpointslice_group(slice: &EndpointSlice, lookup: &impl Lookup) -> Group {
    let meta = &slice.metadata;
    let ns = namespace_of(meta);
    let mut group = Group {
        source: format!("endpointslice/{ns}/{}", name_of(meta)),
        ..Default::default()
    };
    put(&mut group.labels, NAMESPACE, ns);
    put(
        &mut group.labels,
        "__meta_kubernetes_endpointslice_address_type",
        slice.address_type.as_str(),
    );
    add_object_meta(&mut group.labels, meta, "endpointslice");
    let service = meta
        .labels
        .as_ref()
        .and_then(|l| l.get("kubernetes.io/service-name"))
        .and_then(|svc| lookup.service(ns, svc));
    if let Some(svc) = service {
        group.labels.extend(service_labels(svc));
        if secondary_family_slice(svc, slice) {
            return group;
        }
    }

    let mut seen = SeenPods::default();
    let mut add = |addr: &str, ep: &Endpoint, port: &SlicePort| {
        let mut t = Labels::new();
        put(
            &mut t,
            ADDRESS,
            match port.port {
                Some(p) => join_host_port(addr, p),
                None => addr.to_string(),
            },
        );
        if let Some(v) = &port.name {
            put(
                &mut t,
                "__meta_kubernetes_endpointslice_port_name",
                v.as_str(),
            );
        }
        if let Some(v) = &port.protocol {
            put(
                &mut t,
                "__meta_kubernetes_endpointslice_port_protocol",
                v.as_str(),
            );
        }
        if let Some(v) = port.port {
            put(
                &mut t,
                "__meta_kubernetes_endpointslice_port",
                v.to_string(),
            );
        }
        if let Some(v) = &port.app_protocol {
            put(
                &mut t,
                "__meta_kubernetes_endpointslice_port_app_protocol",
                v.as_str(),
            );
        }
        if let Some(c) = &ep.conditions {
            for (name, value) in [
                ("ready", c.ready),
                ("serving", c.serving),
                ("terminating", c.terminating),
            ] {
                if let Some(v) = value {
                    t.insert(
                        format!("{META}endpointslice_endpoint_conditions_{name}"),
                        v.to_string(),
                    );
                }
            }
        }
        if let Some(v) = &ep.hostname {
            put(
                &mut t,
                "__meta_kubernetes_endpointslice_endpoint_hostname",
                v.as_str(),
            );
        }
        if let Some(r) = &ep.target_ref {
            put(
                &mut t,
                "__meta_kubernetes_endpointslice_address_target_kind",
                r.kind.as_deref().unwrap_or(""),
            );
            put(
                &mut t,
                "__meta_kubernetes_endpointslice_address_target_name",
                r.name.as_deref().unwrap_or(""),
            );
        }
        if let Some(v) = &ep.node_name {
            put(
                &mut t,
                "__meta_kubernetes_endpointslice_endpoint_node_name",
                v.as_str(),
            );
        }
        if let Some(v) = &ep.zone {
            put(
                &mut t,
                "__meta_kubernetes_endpointslice_endpoint_zone",
                v.as_str(),
            );
        }
        for (k, v) in ep.deprecated_topology.iter().flatten() {
            let name = sanitize_label_name(k);
            t.insert(
                format!("{META}endpointslice_endpoint_topology_{name}"),
                v.clone(),
            );
            t.insert(
                format!("{META}endpointslice_endpoint_topology_present_{name}"),
                "true".into(),
            );
        }
        if let Some(pod) = referenced_pod(lookup, ep.target_ref.as_ref()) {
            seen.note(pod, port.port);
            match port.port {
                Some(p) => add_pod_and_container(&mut t, pod, p, None),
                None => t.extend(pod_labels(pod)),
            }
        }
        group.targets.push(t);
    };
    let ports = slice.ports.as_deref().unwrap_or_default();
    for ep in slice.endpoints.iter().flatten() {
        for port in ports {
            for addr in &ep.addresses {
                add(addr, ep, port);
            }
        }
    }
    seen.remaining_ports(&mut group);
    group
}

/// A dual-stack Service has one slice per address family; only the primary family's
/// slice yields targets, so each endpoint is probed once.
fn secondary_family_slice(svc: &Service, slice: &EndpointSlice) -> bool {
    let Some(spec) = &svc.spec else {
        return false;
    };
    let dual = matches!(
        spec.ip_family_policy.as_deref(),
        Some("PreferDualStack" | "RequireDualStack")
    );
    match spec.ip_families.as_deref() {
        Some([primary, ..]) if dual => slice.address_type != *primary,
        _ => false,
    }
}
