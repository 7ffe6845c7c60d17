//! What the watches of one `kubernetes_sd_configs` entry have seen, and the groups its
//! role makes of it. Plain data: the watch events come in, the groups go out.
//!
//! Each watch (one kind of object, in one namespace or in all) keeps its own objects: a
//! re-list of one namespace replaces that namespace's objects only, and only once the
//! list is complete, so a list that fails halfway leaves the last complete view in place.

use super::endpoints::{Lookup, endpoints_group, endpointslice_group};
use super::groups::{ingress_group, node_group, pod_group, service_group};
use crate::targets::Group;
use k8s_openapi::api::core::v1::{Endpoints, Node, Pod, Service};
use k8s_openapi::api::discovery::v1::EndpointSlice;
use k8s_openapi::api::networking::v1::Ingress;
use kube::runtime::watcher::Event;
use sonde_proto::config::discovery::kubernetes::KubernetesRole;
use std::collections::BTreeMap;

/// One object of any of the kinds the roles watch (boxed: they differ much in size).
#[derive(Clone, Debug)]
pub enum Object {
    Node(Box<Node>),
    Pod(Box<Pod>),
    Service(Box<Service>),
    Endpoints(Box<Endpoints>),
    EndpointSlice(Box<EndpointSlice>),
    Ingress(Box<Ingress>),
}

macro_rules! object_from {
    ($($kind:ident),*) => {$(
        impl From<$kind> for Object {
            fn from(o: $kind) -> Self {
                Object::$kind(Box::new(o))
            }
        }
    )*};
}
object_from!(Node, Pod, Service, Endpoints, EndpointSlice, Ingress);

/// The kinds of object a role watches; the first is the one its groups come from.
pub fn watched_kinds(role: KubernetesRole) -> &'static [KubernetesRole] {
    use KubernetesRole::*;
    match role {
        Node => &[Node],
        Pod => &[Pod],
        Service => &[Service],
        Ingress => &[Ingress],
        Endpoints => &[Endpoints, Service, Pod],
        EndpointSlice => &[EndpointSlice, Service, Pod],
    }
}

impl Object {
    fn key(&self) -> (String, String) {
        let meta = match self {
            Object::Node(o) => &o.metadata,
            Object::Pod(o) => &o.metadata,
            Object::Service(o) => &o.metadata,
            Object::Endpoints(o) => &o.metadata,
            Object::EndpointSlice(o) => &o.metadata,
            Object::Ingress(o) => &o.metadata,
        };
        (
            meta.namespace.clone().unwrap_or_default(),
            meta.name.clone().unwrap_or_default(),
        )
    }
}

type Key = (String, String);

/// The objects of one watch.
struct Watched {
    kind: KubernetesRole,
    objects: BTreeMap<Key, Object>,
    /// The objects of a re-list under way, which replace `objects` when it completes.
    listing: Option<BTreeMap<Key, Object>>,
    synced: bool,
}

/// Every watch's objects, in the order the watches were started.
pub struct ClusterState {
    role: KubernetesRole,
    watches: Vec<Watched>,
}

impl ClusterState {
    /// `kinds[i]` is the kind of object watch `i` lists.
    pub fn new(role: KubernetesRole, kinds: Vec<KubernetesRole>) -> Self {
        ClusterState {
            role,
            watches: kinds
                .into_iter()
                .map(|kind| Watched {
                    kind,
                    objects: BTreeMap::new(),
                    listing: None,
                    synced: false,
                })
                .collect(),
        }
    }

    /// Applies one event of watch `watch`; true when the objects it holds changed.
    pub fn apply(&mut self, watch: usize, event: Event<Object>) -> bool {
        let w = &mut self.watches[watch];
        match event {
            Event::Init => {
                w.listing = Some(BTreeMap::new());
                false
            }
            Event::InitApply(o) => {
                w.listing.get_or_insert_default().insert(o.key(), o);
                false
            }
            Event::InitDone => {
                w.objects = w.listing.take().unwrap_or_default();
                w.synced = true;
                true
            }
            Event::Apply(o) => {
                w.objects.insert(o.key(), o);
                true
            }
            Event::Delete(o) => w.objects.remove(&o.key()).is_some(),
        }
    }

    /// True once every watch has listed its objects at least once: before that the
    /// groups would be partial (an Endpoints without its Service's labels).
    pub fn synced(&self) -> bool {
        self.watches.iter().all(|w| w.synced)
    }

    fn objects(&self, kind: KubernetesRole) -> impl Iterator<Item = &Object> {
        self.watches
            .iter()
            .filter(move |w| w.kind == kind)
            .flat_map(|w| w.objects.values())
    }

    fn find(&self, kind: KubernetesRole, namespace: &str, name: &str) -> Option<&Object> {
        let key = (namespace.to_string(), name.to_string());
        self.watches
            .iter()
            .filter(|w| w.kind == kind)
            .find_map(|w| w.objects.get(&key))
    }

    /// The groups of the role, sorted by source.
    pub fn groups(&self) -> Vec<Group> {
        let mut groups: Vec<Group> = self
            .objects(self.role)
            .filter_map(|o| match o {
                Object::Node(n) => node_group(n),
                Object::Pod(p) => Some(pod_group(p)),
                Object::Service(s) => Some(service_group(s)),
                Object::Ingress(i) => Some(ingress_group(i)),
                Object::Endpoints(e) => Some(endpoints_group(e, self)),
                Object::EndpointSlice(e) => Some(endpointslice_group(e, self)),
            })
            .collect();
        groups.sort_by(|a, b| a.source.cmp(&b.source));
        groups
    }
}

impl Lookup for ClusterState {
    fn service(&self, namespace: &str, name: &str) -> Option<&Service> {
        match self.find(KubernetesRole::Service, namespace, name)? {
            Object::Service(s) => Some(s.as_ref()),
            _ => None,
        }
    }

    fn pod(&self, namespace: &str, name: &str) -> Option<&Pod> {
        match self.find(KubernetesRole::Pod, namespace, name)? {
            Object::Pod(p) => Some(p.as_ref()),
            _ => None,
        }
    }
}
