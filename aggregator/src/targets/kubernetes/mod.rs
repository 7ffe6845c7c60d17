//! `kubernetes_sd_configs`: targets from the Kubernetes API, with Prometheus's roles
//! (`node`, `pod`, `service`, `endpoints`, `endpointslice`, `ingress`) and its
//! `__meta_kubernetes_*` labels.
//!
//! Each entry lists and then watches the objects its role needs (kube-runtime's watcher:
//! it resumes a broken watch from the last resourceVersion it saw, and lists again when
//! that version has expired), keeps them in a [`ClusterState`], and publishes the role's
//! groups whenever they change. An error (the API server unreachable, a 403 from RBAC) is
//! logged with what to do about it, and the groups published last stay as they are.

mod client;
mod endpoints;
mod groups;
mod state;

pub use client::{ClientError, Connection, connect};
pub use endpoints::{Lookup, endpoints_group, endpointslice_group};
pub use groups::{ingress_group, node_group, pod_group, sanitize_label_name, service_group};
pub use state::{ClusterState, Object, watched_kinds};

use super::{Group, Publisher, Source};
use futures::FutureExt;
use futures::stream::{self, BoxStream, StreamExt};
use k8s_openapi::NamespaceResourceScope;
use k8s_openapi::api::core::v1::{Endpoints, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::Ingress;
use kube::api::Api;
use kube::runtime::WatchStreamExt;
use kube::runtime::watcher::{self, Event};
use kube::{Resource, ResourceExt};
use serde::de::DeserializeOwned;
use sonde_proto::config::discovery::kubernetes::{KubernetesRole, KubernetesSdConfig};
use std::fmt::Debug;
use std::time::Duration;

/// How long to wait before trying again to make a client whose config failed (a missing
/// kubeconfig or token file may yet appear).
const CONNECT_RETRY: Duration = Duration::from_secs(30);

/// Events applied at most before the groups are rebuilt, when a burst (a re-list of a big
/// namespace) keeps coming.
const BURST: usize = 10_000;

/// The plural the API uses for a kind, as RBAC rules name it.
fn resource_name(kind: KubernetesRole) -> &'static str {
    match kind {
        KubernetesRole::Node => "nodes",
        KubernetesRole::Pod => "pods",
        KubernetesRole::Service => "services",
        KubernetesRole::Endpoints => "endpoints",
        KubernetesRole::EndpointSlice => "endpointslices",
        KubernetesRole::Ingress => "ingresses",
    }
}

/// One watch: a kind of object, in one namespace (`None`: every namespace).
struct Watch {
    kind: KubernetesRole,
    namespace: Option<String>,
    /// Whether its last event was an error, so that recovery is logged once.
    failing: bool,
}

impl Watch {
    fn place(&self) -> String {
        match &self.namespace {
            Some(ns) => format!("{} in namespace {ns}", resource_name(self.kind)),
            None => format!("{} in every namespace", resource_name(self.kind)),
        }
    }
}

/// The background source of one `kubernetes_sd_configs` entry of `job`.
pub fn source(job: &str, sd: &KubernetesSdConfig) -> Source {
    let (job, sd) = (job.to_string(), sd.clone());
    Source::new("kubernetes", move |publisher| async move {
        run(&job, &sd, &publisher).await;
    })
}

/// Runs the discovery of one `kubernetes_sd_configs` entry of `job` until dropped,
/// publishing the role's whole set of groups each time it changes (first once every
/// object it needs has been listed); errors are reported to `publisher`, and the groups
/// published before stay.
pub async fn run(job: &str, sd: &KubernetesSdConfig, publisher: &Publisher) {
    let connection = loop {
        match connect(sd).await {
            Ok(c) => break c,
            Err(e) => {
                publisher.failed(&format!(
                    "kubernetes_sd_configs ({} role): cannot make an API client: {e}; trying again in 30s",
                    sd.role
                ));
                tokio::time::sleep(CONNECT_RETRY).await;
            }
        }
    };
    tracing::info!(job, role = %sd.role, api_server = %connection.url, "kubernetes_sd_configs: watching");
    let namespaces: Vec<Option<String>> = match (&connection.namespaces, sd.role) {
        (_, KubernetesRole::Node) | (None, _) => vec![None],
        (Some(names), _) => names.iter().cloned().map(Some).collect(),
    };
    let mut watches = Vec::new();
    let mut streams = Vec::new();
    for &kind in watched_kinds(sd.role) {
        let mut config = watcher::Config::default();
        if let Some(s) = sd.selector_for(kind) {
            if let Some(label) = &s.label {
                config = config.labels(label);
            }
            if let Some(field) = &s.field {
                config = config.fields(field);
            }
        }
        for namespace in &namespaces {
            let i = watches.len();
            let events = watch_events(
                &connection.client,
                kind,
                namespace.as_deref(),
                config.clone(),
            );
            streams.push(events.map(move |e| (i, e)).boxed());
            watches.push(Watch {
                kind,
                namespace: namespace.clone(),
                failing: false,
            });
        }
    }
    let mut events = stream::select_all(streams);
    let mut state = ClusterState::new(sd.role, watches.iter().map(|w| w.kind).collect());
    let mut published: Option<Vec<Group>> = None;
    while let Some(first) = events.next().await {
        let mut changed = false;
        let mut next = Some(first);
        let mut taken = 0;
        // Whatever else is already waiting goes in the same update.
        while let Some((i, event)) = next {
            let watch = &mut watches[i];
            match event {
                Ok(event) => {
                    if watch.failing && !matches!(event, Event::Init) {
                        watch.failing = false;
                        tracing::info!(job, role = %sd.role, api_server = %connection.url, "kubernetes_sd_configs: {} answer again", watch.place());
                    }
                    changed |= state.apply(i, event);
                }
                Err(e) => {
                    watch.failing = true;
                    if let Some(problem) = explain_watch_error(sd.role, &connection.url, watch, &e)
                    {
                        publisher.failed(&problem);
                    }
                }
            }
            taken += 1;
            next = if taken < BURST {
                events.next().now_or_never().flatten()
            } else {
                None
            };
        }
        if changed && state.synced() {
            let groups = state.groups();
            if published.as_ref() != Some(&groups) {
                publisher.publish(groups.clone());
                published = Some(groups);
            }
        }
    }
}

fn watch_events(
    client: &kube::Client,
    kind: KubernetesRole,
    namespace: Option<&str>,
    config: watcher::Config,
) -> BoxStream<'static, Result<Event<Object>, watcher::Error>> {
    let c = client.clone();
    match kind {
        KubernetesRole::Node => typed(Api::<Node>::all(c), config),
        KubernetesRole::Pod => typed(api::<Pod>(c, namespace), config),
        KubernetesRole::Service => typed(api::<Service>(c, namespace), config),
        KubernetesRole::Endpoints => typed(api::<Endpoints>(c, namespace), config),
        KubernetesRole::EndpointSlice => typed(api::<EndpointSlice>(c, namespace), config),
        KubernetesRole::Ingress => typed(api::<Ingress>(c, namespace), config),
    }
}

fn api<K>(client: kube::Client, namespace: Option<&str>) -> Api<K>
where
    K: Resource<Scope = NamespaceResourceScope>,
    K::DynamicType: Default,
{
    match namespace {
        Some(ns) => Api::namespaced(client, ns),
        None => Api::all(client),
    }
}

/// The watcher's events for one kind, backed off after errors, the objects' managed
/// fields dropped (they are most of an object's size and no label comes from them).
fn typed<K>(
    api: Api<K>,
    config: watcher::Config,
) -> BoxStream<'static, Result<Event<Object>, watcher::Error>>
where
    K: Resource + Clone + DeserializeOwned + Debug + Send + 'static,
    Object: From<K>,
{
    let wrap = Object::from;
    watcher::watcher(api, config)
        .default_backoff()
        .map(move |r| {
            r.map(|e| {
                let e = e.modify(|o| o.managed_fields_mut().clear());
                match e {
                    Event::Apply(o) => Event::Apply(wrap(o)),
                    Event::Delete(o) => Event::Delete(wrap(o)),
                    Event::Init => Event::Init,
                    Event::InitApply(o) => Event::InitApply(wrap(o)),
                    Event::InitDone => Event::InitDone,
                }
            })
        })
        .boxed()
}

/// What went wrong with a watch and what to do about it, for the failure log; `None` for
/// an expired watch (410 Gone), which is routine: the watcher lists again.
fn explain_watch_error(
    role: KubernetesRole,
    url: &str,
    watch: &Watch,
    e: &watcher::Error,
) -> Option<String> {
    let resource = resource_name(watch.kind);
    let what = watch.place();
    let head = format!("kubernetes_sd_configs ({role} role, api_server {url})");
    let kept = "the targets found before are kept; trying again";
    let client_error = match e {
        watcher::Error::WatchError(status) if status.code == 410 => {
            tracing::info!(%role, api_server = url, "kubernetes_sd_configs: the watch of {what} expired (410 Gone); listing them again");
            return None;
        }
        watcher::Error::WatchError(status) => {
            return Some(format!(
                "{head}: watching {what}: {} {}: {}; {kept}",
                status.code, status.reason, status.message
            ));
        }
        watcher::Error::NoResourceVersion => {
            return Some(format!(
                "{head}: listing {what}: the answer has no resourceVersion; is {url} a Kubernetes API server? {kept}"
            ));
        }
        watcher::Error::InitialListFailed(e)
        | watcher::Error::WatchStartFailed(e)
        | watcher::Error::WatchFailed(e) => e,
    };
    let doing = match e {
        watcher::Error::InitialListFailed(_) => "listing",
        _ => "watching",
    };
    let advice = match client_error {
        kube::Error::Api(s) if s.code == 403 => format!(
            "forbidden (403): {}; give the aggregator's service account get, list and watch on {resource} (a ClusterRole like deploy/kubernetes/base/aggregator-rbac.yaml)",
            s.message
        ),
        kube::Error::Api(s) if s.code == 401 => format!(
            "unauthorized (401): {}; check the token or client certificate the aggregator presents",
            s.message
        ),
        kube::Error::Api(s) if s.code == 404 => format!(
            "not found (404): {}; this API server does not serve {resource} (too old a Kubernetes?)",
            s.message
        ),
        kube::Error::Api(s) => format!("{} {}: {}", s.code, s.reason, s.message),
        kube::Error::HyperError(_) | kube::Error::Service(_) => format!(
            "cannot reach the API server: {}; check api_server and the network",
            error_chain(client_error)
        ),
        other => error_chain(other),
    };
    Some(format!("{head}: {doing} {what}: {advice}; {kept}"))
}

/// An error and its causes, `a: b: c`, without repeats (hyper's messages often repeat
/// their cause's).
fn error_chain(e: &dyn std::error::Error) -> String {
    let mut parts: Vec<String> = vec![e.to_string()];
    let mut source = e.source();
    while let Some(s) = source {
        let text = s.to_string();
        if !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
        source = s.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests;
