//! Each role's groups from objects as an API server returns them (the recorded lists in
//! tests/fixtures/kubernetes), label for label against what Prometheus gives them.

use super::*;
use k8s_openapi::List;
use sonde_proto::config::Labels;

fn list<K: serde::de::DeserializeOwned + k8s_openapi::ListableResource>(json: &str) -> Vec<K> {
    serde_json::from_str::<List<K>>(json).unwrap().items
}

fn services() -> Vec<Service> {
    list(include_str!(
        "../../../../tests/fixtures/kubernetes/services.json"
    ))
}
fn ingresses() -> Vec<Ingress> {
    list(include_str!(
        "../../../../tests/fixtures/kubernetes/ingresses.json"
    ))
}
fn pods() -> Vec<Pod> {
    list(include_str!(
        "../../../../tests/fixtures/kubernetes/pods.json"
    ))
}
fn endpoints() -> Vec<Endpoints> {
    list(include_str!(
        "../../../../tests/fixtures/kubernetes/endpoints.json"
    ))
}
fn slices() -> Vec<EndpointSlice> {
    list(include_str!(
        "../../../../tests/fixtures/kubernetes/endpointslices.json"
    ))
}
fn nodes() -> Vec<Node> {
    list(include_str!(
        "../../../../tests/fixtures/kubernetes/nodes.json"
    ))
}

fn labels(pairs: &[(&str, &str)]) -> Labels {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// `expected` with `common` under it.
fn with(common: &Labels, expected: &[(&str, &str)]) -> Labels {
    let mut all = common.clone();
    all.extend(labels(expected));
    all
}

const WEB_SERVICE_META: &[(&str, &str)] = &[
    ("__meta_kubernetes_namespace", "shop"),
    ("__meta_kubernetes_service_name", "web"),
    (
        "__meta_kubernetes_service_label_app_kubernetes_io_name",
        "web",
    ),
    (
        "__meta_kubernetes_service_labelpresent_app_kubernetes_io_name",
        "true",
    ),
    (
        "__meta_kubernetes_service_label_app_kubernetes_io_part_of",
        "shop",
    ),
    (
        "__meta_kubernetes_service_labelpresent_app_kubernetes_io_part_of",
        "true",
    ),
    (
        "__meta_kubernetes_service_annotation_prometheus_io_probe",
        "true",
    ),
    (
        "__meta_kubernetes_service_annotationpresent_prometheus_io_probe",
        "true",
    ),
    (
        "__meta_kubernetes_service_annotationpresent_kubectl_kubernetes_io_last_applied_configuration",
        "true",
    ),
];

/// The web Service's group labels (the last-applied annotation's value is long: taken
/// from the object).
fn web_service_labels() -> Labels {
    let mut l = labels(WEB_SERVICE_META);
    let svc = &services()[0];
    l.insert(
        "__meta_kubernetes_service_annotation_kubectl_kubernetes_io_last_applied_configuration"
            .into(),
        svc.metadata.annotations.as_ref().unwrap()
            ["kubectl.kubernetes.io/last-applied-configuration"]
            .clone(),
    );
    l
}

#[test]
fn service_role() {
    let svcs = services();
    let web = service_group(&svcs[0]);
    assert_eq!(web.source, "svc/shop/web");
    assert_eq!(web.labels, web_service_labels());
    assert_eq!(
        web.targets,
        [labels(&[
            ("__address__", "web.shop.svc:80"),
            ("__meta_kubernetes_service_port_name", "http"),
            ("__meta_kubernetes_service_port_number", "80"),
            ("__meta_kubernetes_service_port_protocol", "TCP"),
            ("__meta_kubernetes_service_type", "ClusterIP"),
            ("__meta_kubernetes_service_cluster_ip", "10.96.141.7"),
        ])]
    );

    let payments = service_group(&svcs[1]);
    let lb = |addr: &str, name: &str, port: &str| {
        labels(&[
            ("__address__", addr),
            ("__meta_kubernetes_service_port_name", name),
            ("__meta_kubernetes_service_port_number", port),
            ("__meta_kubernetes_service_port_protocol", "TCP"),
            ("__meta_kubernetes_service_type", "LoadBalancer"),
            ("__meta_kubernetes_service_cluster_ip", "10.96.22.190"),
            ("__meta_kubernetes_service_loadbalancer_ip", "203.0.113.40"),
        ])
    };
    assert_eq!(
        payments.targets,
        [
            lb("payments.shop.svc:443", "https", "443"),
            lb("payments.shop.svc:9090", "grpc", "9090")
        ]
    );

    let external = service_group(&svcs[2]);
    assert_eq!(
        external.targets,
        [labels(&[
            ("__address__", "billing-api.shop.svc:443"),
            ("__meta_kubernetes_service_port_name", ""),
            ("__meta_kubernetes_service_port_number", "443"),
            ("__meta_kubernetes_service_port_protocol", "TCP"),
            ("__meta_kubernetes_service_type", "ExternalName"),
            (
                "__meta_kubernetes_service_external_name",
                "billing.example.net"
            ),
        ])]
    );
    assert_eq!(
        external.labels,
        labels(&[
            ("__meta_kubernetes_namespace", "shop"),
            ("__meta_kubernetes_service_name", "billing-api"),
        ])
    );
}

#[test]
fn ingress_role() {
    let ings = ingresses();
    let storefront = ingress_group(&ings[0]);
    assert_eq!(storefront.source, "ingress/shop/storefront");
    assert_eq!(
        storefront.labels,
        labels(&[
            ("__meta_kubernetes_namespace", "shop"),
            ("__meta_kubernetes_ingress_name", "storefront"),
            ("__meta_kubernetes_ingress_class_name", "nginx"),
            (
                "__meta_kubernetes_ingress_label_app_kubernetes_io_name",
                "web"
            ),
            (
                "__meta_kubernetes_ingress_labelpresent_app_kubernetes_io_name",
                "true"
            ),
            (
                "__meta_kubernetes_ingress_annotation_cert_manager_io_cluster_issuer",
                "letsencrypt"
            ),
            (
                "__meta_kubernetes_ingress_annotationpresent_cert_manager_io_cluster_issuer",
                "true"
            ),
            (
                "__meta_kubernetes_ingress_annotation_prometheus_io_probe",
                "true"
            ),
            (
                "__meta_kubernetes_ingress_annotationpresent_prometheus_io_probe",
                "true"
            ),
        ])
    );
    let target = |host: &str, scheme: &str, path: &str| {
        labels(&[
            ("__address__", host),
            ("__meta_kubernetes_ingress_host", host),
            ("__meta_kubernetes_ingress_scheme", scheme),
            ("__meta_kubernetes_ingress_path", path),
        ])
    };
    // The wildcard TLS host covers www.shop.example; a path left out is "/".
    assert_eq!(
        storefront.targets,
        [
            target("www.shop.example", "https", "/"),
            target("www.shop.example", "https", "/api"),
            target("status.example.org", "http", "/"),
        ]
    );
    // A rule without `http` is the root path; no class name, no label for it.
    let admin = ingress_group(&ings[1]);
    assert_eq!(admin.targets, [target("admin.shop.internal", "http", "/")]);
    assert!(
        !admin
            .labels
            .contains_key("__meta_kubernetes_ingress_class_name")
    );
}

fn pod_common(name: &str, ip: &str, ready: &str, node: &str, host_ip: &str, uid: &str) -> Labels {
    labels(&[
        ("__meta_kubernetes_pod_name", name),
        ("__meta_kubernetes_pod_ip", ip),
        ("__meta_kubernetes_pod_ready", ready),
        ("__meta_kubernetes_pod_phase", "Running"),
        ("__meta_kubernetes_pod_node_name", node),
        ("__meta_kubernetes_pod_host_ip", host_ip),
        ("__meta_kubernetes_pod_uid", uid),
        ("__meta_kubernetes_pod_label_app_kubernetes_io_name", "web"),
        (
            "__meta_kubernetes_pod_labelpresent_app_kubernetes_io_name",
            "true",
        ),
        ("__meta_kubernetes_pod_label_pod_template_hash", "7d9c6b5f4"),
        (
            "__meta_kubernetes_pod_labelpresent_pod_template_hash",
            "true",
        ),
        ("__meta_kubernetes_pod_controller_kind", "ReplicaSet"),
        ("__meta_kubernetes_pod_controller_name", "web-7d9c6b5f4"),
    ])
}

fn first_pod_labels() -> Labels {
    let mut l = pod_common(
        "web-7d9c6b5f4-x2k8p",
        "10.244.1.23",
        "true",
        "worker-1",
        "192.0.2.11",
        "3e5d2c1b-0a9f-4e8d-7c6b-5a4f3e2d1c0b",
    );
    l.extend(labels(&[
        (
            "__meta_kubernetes_pod_annotation_kubectl_kubernetes_io_restartedAt",
            "2026-11-30T09:12:40Z",
        ),
        (
            "__meta_kubernetes_pod_annotationpresent_kubectl_kubernetes_io_restartedAt",
            "true",
        ),
    ]));
    l
}

fn second_pod_labels() -> Labels {
    pod_common(
        "web-7d9c6b5f4-q9z4m",
        "10.244.2.7",
        "false",
        "worker-2",
        "192.0.2.12",
        "7a6b5c4d-3e2f-4a1b-9c8d-7e6f5a4b3c2d",
    )
}

#[test]
fn pod_role() {
    let all = pods();
    let web = pod_group(&all[0]);
    assert_eq!(web.source, "pod/shop/web-7d9c6b5f4-x2k8p");
    assert_eq!(
        web.labels,
        with(
            &first_pod_labels(),
            &[("__meta_kubernetes_namespace", "shop")]
        )
    );
    let web_id = "containerd://1a2b3c4d5e6f70811a2b3c4d5e6f70811a2b3c4d5e6f70811a2b3c4d5e6f7081";
    let port = |addr: &str, name: &str, number: &str| {
        labels(&[
            ("__address__", addr),
            ("__meta_kubernetes_pod_container_name", "web"),
            ("__meta_kubernetes_pod_container_id", web_id),
            (
                "__meta_kubernetes_pod_container_image",
                "registry.example/shop/web:2.4.1",
            ),
            ("__meta_kubernetes_pod_container_init", "false"),
            ("__meta_kubernetes_pod_container_port_name", name),
            ("__meta_kubernetes_pod_container_port_number", number),
            ("__meta_kubernetes_pod_container_port_protocol", "TCP"),
        ])
    };
    assert_eq!(
        web.targets,
        [
            port("10.244.1.23:8080", "http", "8080"),
            port("10.244.1.23:9102", "metrics", "9102"),
            // The init container has no ports: one target at the bare Pod IP.
            labels(&[
                ("__address__", "10.244.1.23"),
                ("__meta_kubernetes_pod_container_name", "migrate"),
                (
                    "__meta_kubernetes_pod_container_id",
                    "containerd://8f1e2d3c4b5a69788f1e2d3c4b5a69788f1e2d3c4b5a69788f1e2d3c4b5a6978"
                ),
                (
                    "__meta_kubernetes_pod_container_image",
                    "registry.example/shop/web:2.4.1"
                ),
                ("__meta_kubernetes_pod_container_init", "true"),
            ]),
        ]
    );
    // A Pod without an IP yet yields an empty group (so its old targets go away).
    let pending = pod_group(&all[2]);
    assert_eq!(pending.source, "pod/shop/batch-report-29410560-tq7xz");
    assert!(pending.targets.is_empty() && pending.labels.is_empty());
}

#[test]
fn node_role() {
    let group = node_group(&nodes()[0]).unwrap();
    assert_eq!(group.source, "node/worker-1");
    assert_eq!(
        group.targets,
        [labels(&[
            ("__address__", "192.0.2.11:10250"),
            ("instance", "worker-1"),
            ("__meta_kubernetes_node_address_InternalIP", "192.0.2.11"),
            ("__meta_kubernetes_node_address_Hostname", "worker-1"),
        ])]
    );
    assert_eq!(
        group.labels["__meta_kubernetes_node_provider_id"],
        "kind://docker/shop/worker-1"
    );
    assert_eq!(
        group.labels["__meta_kubernetes_node_condition_ready"],
        "true"
    );
    assert_eq!(
        group.labels["__meta_kubernetes_node_condition_memorypressure"],
        "false"
    );
    assert_eq!(
        group.labels["__meta_kubernetes_node_label_topology_kubernetes_io_zone"],
        "eu-west-1a"
    );
}

/// Services and Pods by namespace and name, for the endpoints roles.
struct Objects {
    services: Vec<Service>,
    pods: Vec<Pod>,
}

impl Lookup for Objects {
    fn service(&self, ns: &str, name: &str) -> Option<&Service> {
        self.services.iter().find(|s| {
            s.metadata.namespace.as_deref() == Some(ns) && s.metadata.name.as_deref() == Some(name)
        })
    }
    fn pod(&self, ns: &str, name: &str) -> Option<&Pod> {
        self.pods.iter().find(|p| {
            p.metadata.namespace.as_deref() == Some(ns) && p.metadata.name.as_deref() == Some(name)
        })
    }
}

fn objects() -> Objects {
    Objects {
        services: services(),
        pods: pods(),
    }
}

/// The container labels of the web container's `metrics` port, which no endpoint port
/// covers: Prometheus adds a target for it.
fn metrics_port(pod: Labels, ip: &str) -> Labels {
    with(
        &pod,
        &[
            ("__address__", &format!("{ip}:9102")),
            ("__meta_kubernetes_pod_container_name", "web"),
            (
                "__meta_kubernetes_pod_container_image",
                "registry.example/shop/web:2.4.1",
            ),
            ("__meta_kubernetes_pod_container_port_name", "metrics"),
            ("__meta_kubernetes_pod_container_port_number", "9102"),
            ("__meta_kubernetes_pod_container_port_protocol", "TCP"),
            ("__meta_kubernetes_pod_container_init", "false"),
        ],
    )
}

const HTTP_CONTAINER: &[(&str, &str)] = &[
    ("__meta_kubernetes_pod_container_name", "web"),
    (
        "__meta_kubernetes_pod_container_image",
        "registry.example/shop/web:2.4.1",
    ),
    ("__meta_kubernetes_pod_container_port_name", "http"),
    ("__meta_kubernetes_pod_container_port_number", "8080"),
    ("__meta_kubernetes_pod_container_port_protocol", "TCP"),
    ("__meta_kubernetes_pod_container_init", "false"),
];

#[test]
fn endpoints_role() {
    let objects = objects();
    let eps = endpoints();
    let web = endpoints_group(&eps[0], &objects);
    assert_eq!(web.source, "endpoints/shop/web");
    let mut group_labels = web_service_labels();
    group_labels.extend(labels(&[
        ("__meta_kubernetes_endpoints_name", "web"),
        ("__meta_kubernetes_endpoints_label_app_kubernetes_io_name", "web"),
        ("__meta_kubernetes_endpoints_labelpresent_app_kubernetes_io_name", "true"),
        ("__meta_kubernetes_endpoints_label_app_kubernetes_io_part_of", "shop"),
        ("__meta_kubernetes_endpoints_labelpresent_app_kubernetes_io_part_of", "true"),
        (
            "__meta_kubernetes_endpoints_annotation_endpoints_kubernetes_io_last_change_trigger_time",
            "2026-11-30T10:01:12Z",
        ),
        (
            "__meta_kubernetes_endpoints_annotationpresent_endpoints_kubernetes_io_last_change_trigger_time",
            "true",
        ),
    ]));
    assert_eq!(web.labels, group_labels);
    let endpoint = |pod: Labels, addr: &str, ready: &str, node: &str, pod_name: &str| {
        let mut t = with(
            &pod,
            &[
                ("__address__", addr),
                ("__meta_kubernetes_endpoint_port_name", "http"),
                ("__meta_kubernetes_endpoint_port_protocol", "TCP"),
                ("__meta_kubernetes_endpoint_ready", ready),
                ("__meta_kubernetes_endpoint_address_target_kind", "Pod"),
                ("__meta_kubernetes_endpoint_address_target_name", pod_name),
                ("__meta_kubernetes_endpoint_node_name", node),
            ],
        );
        t.extend(labels(HTTP_CONTAINER));
        t
    };
    assert_eq!(
        web.targets,
        [
            endpoint(
                first_pod_labels(),
                "10.244.1.23:8080",
                "true",
                "worker-1",
                "web-7d9c6b5f4-x2k8p"
            ),
            endpoint(
                second_pod_labels(),
                "10.244.2.7:8080",
                "false",
                "worker-2",
                "web-7d9c6b5f4-q9z4m"
            ),
            metrics_port(first_pod_labels(), "10.244.1.23"),
            metrics_port(second_pod_labels(), "10.244.2.7"),
        ]
    );

    // No Service of that name and no Pod behind the address: the endpoint's own labels.
    let api = endpoints_group(&eps[1], &objects);
    assert_eq!(
        api.labels,
        labels(&[
            ("__meta_kubernetes_namespace", "default"),
            ("__meta_kubernetes_endpoints_name", "kubernetes"),
            (
                "__meta_kubernetes_endpoints_label_endpointslice_kubernetes_io_skip_mirror",
                "true"
            ),
            (
                "__meta_kubernetes_endpoints_labelpresent_endpointslice_kubernetes_io_skip_mirror",
                "true"
            ),
        ])
    );
    assert_eq!(
        api.targets,
        [labels(&[
            ("__address__", "192.0.2.10:6443"),
            ("__meta_kubernetes_endpoint_port_name", "https"),
            ("__meta_kubernetes_endpoint_port_protocol", "TCP"),
            ("__meta_kubernetes_endpoint_ready", "true"),
        ])]
    );
}

#[test]
fn endpointslice_role() {
    let objects = objects();
    let web = endpointslice_group(&slices()[0], &objects);
    assert_eq!(web.source, "endpointslice/shop/web-8xk2q");
    assert_eq!(
        web.labels["__meta_kubernetes_endpointslice_address_type"],
        "IPv4"
    );
    assert_eq!(
        web.labels["__meta_kubernetes_endpointslice_name"],
        "web-8xk2q"
    );
    assert_eq!(
        web.labels["__meta_kubernetes_endpointslice_label_kubernetes_io_service_name"],
        "web"
    );
    // The Service's labels come through the kubernetes.io/service-name label.
    for (k, v) in web_service_labels() {
        assert_eq!(web.labels.get(&k), Some(&v), "{k}");
    }
    let endpoint =
        |pod: Labels, addr: &str, ready: &str, node: &str, zone: &str, pod_name: &str| {
            let mut t = with(
                &pod,
                &[
                    ("__address__", addr),
                    ("__meta_kubernetes_endpointslice_port_name", "http"),
                    ("__meta_kubernetes_endpointslice_port_protocol", "TCP"),
                    ("__meta_kubernetes_endpointslice_port", "8080"),
                    (
                        "__meta_kubernetes_endpointslice_endpoint_conditions_ready",
                        ready,
                    ),
                    (
                        "__meta_kubernetes_endpointslice_endpoint_conditions_serving",
                        ready,
                    ),
                    (
                        "__meta_kubernetes_endpointslice_endpoint_conditions_terminating",
                        "false",
                    ),
                    ("__meta_kubernetes_endpointslice_address_target_kind", "Pod"),
                    (
                        "__meta_kubernetes_endpointslice_address_target_name",
                        pod_name,
                    ),
                    ("__meta_kubernetes_endpointslice_endpoint_node_name", node),
                    ("__meta_kubernetes_endpointslice_endpoint_zone", zone),
                ],
            );
            t.extend(labels(HTTP_CONTAINER));
            t
        };
    assert_eq!(
        web.targets,
        [
            endpoint(
                first_pod_labels(),
                "10.244.1.23:8080",
                "true",
                "worker-1",
                "eu-west-1a",
                "web-7d9c6b5f4-x2k8p"
            ),
            endpoint(
                second_pod_labels(),
                "10.244.2.7:8080",
                "false",
                "worker-2",
                "eu-west-1b",
                "web-7d9c6b5f4-q9z4m"
            ),
            metrics_port(first_pod_labels(), "10.244.1.23"),
            metrics_port(second_pod_labels(), "10.244.2.7"),
        ]
    );
}

#[test]
fn sanitized_names_and_ipv6_addresses() {
    assert_eq!(
        sanitize_label_name("app.kubernetes.io/name"),
        "app_kubernetes_io_name"
    );
    assert_eq!(sanitize_label_name("ünïcode-key"), "_n_code_key");
    let mut svc = services()[0].clone();
    svc.metadata.name = Some("v6".into());
    let mut pod = pods()[0].clone();
    pod.status.as_mut().unwrap().pod_ip = Some("fd00::17".into());
    assert_eq!(pod_group(&pod).targets[0]["__address__"], "[fd00::17]:8080");
    assert_eq!(
        service_group(&svc).targets[0]["__address__"],
        "v6.shop.svc:80"
    );
}

fn event<K>(e: Event<K>) -> Event<Object>
where
    Object: From<K>,
{
    let wrap = Object::from;
    match e {
        Event::Apply(o) => Event::Apply(wrap(o)),
        Event::Delete(o) => Event::Delete(wrap(o)),
        Event::Init => Event::Init,
        Event::InitApply(o) => Event::InitApply(wrap(o)),
        Event::InitDone => Event::InitDone,
    }
}

#[test]
fn state_keeps_a_view_until_a_relist_completes_and_joins_services_and_pods() {
    use KubernetesRole::*;
    let mut state = ClusterState::new(Endpoints, vec![Endpoints, Service, Pod]);
    let eps = endpoints();
    state.apply(0, Event::Init);
    state.apply(0, event(Event::InitApply(eps[0].clone())));
    assert!(state.apply(0, Event::InitDone));
    assert!(!state.synced(), "the Services and Pods are not listed yet");
    state.apply(1, Event::Init);
    for s in services() {
        state.apply(1, event(Event::InitApply(s)));
    }
    state.apply(1, Event::InitDone);
    state.apply(2, Event::Init);
    state.apply(2, Event::InitDone);
    assert!(state.synced());
    let groups = state.groups();
    assert_eq!(groups.len(), 1);
    assert_eq!(groups[0].labels["__meta_kubernetes_service_name"], "web");
    assert!(!groups[0].targets[0].contains_key("__meta_kubernetes_pod_name"));

    // A Pod appearing joins its endpoint.
    state.apply(2, event(Event::Apply(pods()[0].clone())));
    assert_eq!(
        state.groups()[0].targets[0]["__meta_kubernetes_pod_name"],
        "web-7d9c6b5f4-x2k8p"
    );

    // A re-list that has not completed changes nothing; a completed one replaces all.
    state.apply(0, Event::Init);
    state.apply(0, event(Event::InitApply(eps[1].clone())));
    assert_eq!(state.groups()[0].source, "endpoints/shop/web");
    state.apply(0, Event::InitDone);
    let sources: Vec<_> = state.groups().into_iter().map(|g| g.source).collect();
    assert_eq!(sources, ["endpoints/default/kubernetes"]);

    assert!(state.apply(0, event(Event::Delete(eps[1].clone()))));
    assert!(state.groups().is_empty());
}
