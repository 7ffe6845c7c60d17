//! `kubernetes_sd_configs`: Prometheus's Kubernetes discovery block, field for field
//! (`role`, `api_server`, `kubeconfig_file`, `namespaces`, `selectors` and the HTTP client
//! options), with Prometheus's rules about which fields go together.

use super::{SdAuthorization, SdBasicAuth, SdSecret, SdTlsConfig};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::{Path, PathBuf};

/// One `kubernetes_sd_configs` entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesSdConfig {
    pub role: KubernetesRole,
    /// The API server's URL; absent with no `kubeconfig_file`: the in-cluster config (the
    /// pod's service account).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub api_server: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubeconfig_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "NamespaceDiscovery::is_empty")]
    pub namespaces: NamespaceDiscovery,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub selectors: Vec<KubernetesSelector>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub basic_auth: Option<SdBasicAuth>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authorization: Option<SdAuthorization>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearer_token: Option<SdSecret>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bearer_token_file: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls_config: Option<SdTlsConfig>,
}

/// The kind of object each target comes from, with Prometheus's names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KubernetesRole {
    Node,
    Pod,
    Service,
    Endpoints,
    #[serde(rename = "endpointslice")]
    EndpointSlice,
    Ingress,
}

impl KubernetesRole {
    pub fn as_str(self) -> &'static str {
        match self {
            KubernetesRole::Node => "node",
            KubernetesRole::Pod => "pod",
            KubernetesRole::Service => "service",
            KubernetesRole::Endpoints => "endpoints",
            KubernetesRole::EndpointSlice => "endpointslice",
            KubernetesRole::Ingress => "ingress",
        }
    }

    /// The roles whose selectors apply to a discovery of this role (Prometheus's table:
    /// `endpoints` also watches the Services and Pods its targets refer to).
    pub fn selector_roles(self) -> &'static [KubernetesRole] {
        use KubernetesRole::*;
        match self {
            Node => &[Node],
            Pod => &[Pod, Node],
            Service => &[Service],
            Endpoints => &[Pod, Service, Endpoints],
            EndpointSlice => &[Pod, Service, EndpointSlice],
            Ingress => &[Ingress],
        }
    }
}

impl fmt::Display for KubernetesRole {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Which namespaces to watch; empty (the default) is every namespace.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NamespaceDiscovery {
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub own_namespace: bool,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub names: Vec<String>,
}

impl NamespaceDiscovery {
    fn is_empty(&self) -> bool {
        !self.own_namespace && self.names.is_empty()
    }
}

/// A label and/or field selector passed to the API server for the objects of one role.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KubernetesSelector {
    pub role: KubernetesRole,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub label: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
}

/// True for the `Bearer` scheme (the default), which the client re-reads from
/// `credentials_file` as the token rotates.
pub fn is_bearer(authorization: &SdAuthorization) -> bool {
    authorization
        .kind
        .as_deref()
        .is_none_or(|k| k.eq_ignore_ascii_case("bearer"))
}

impl KubernetesSdConfig {
    /// True when any HTTP client option (authentication, TLS) is set.
    pub fn has_http_client_options(&self) -> bool {
        self.basic_auth.is_some()
            || self.authorization.is_some()
            || self.bearer_token.is_some()
            || self.bearer_token_file.is_some()
            || self.tls_config.is_some()
    }

    /// Checks the rules Prometheus applies to this block; the message says what to change.
    pub fn validate(&self) -> Result<(), String> {
        if let Some(url) = &self.api_server
            && !is_http_url(url)
        {
            return Err(format!(
                "api_server {url:?} is not an http:// or https:// URL, like \"https://kubernetes.default.svc\""
            ));
        }
        if self.api_server.is_some() && self.kubeconfig_file.is_some() {
            return Err(
                "cannot use 'kubeconfig_file' and 'api_server' simultaneously; keep one".into(),
            );
        }
        if self.kubeconfig_file.is_some() && self.has_http_client_options() {
            return Err("cannot use a custom HTTP client configuration (authentication, tls_config) together with 'kubeconfig_file'; put them in the kubeconfig file".into());
        }
        if self.api_server.is_none() && self.has_http_client_options() {
            return Err("to use custom HTTP client configuration please provide the 'api_server' URL explicitly (without it the in-cluster service account is used)".into());
        }
        if self.namespaces.own_namespace && self.api_server.is_some() {
            return Err("cannot use 'api_server' and 'namespaces.own_namespace' simultaneously: the own namespace is known only inside the cluster".into());
        }
        if self.namespaces.own_namespace && self.kubeconfig_file.is_some() {
            return Err("cannot use 'kubeconfig_file' and 'namespaces.own_namespace' simultaneously: the own namespace is known only inside the cluster".into());
        }
        if let Some(name) = self.namespaces.names.iter().find(|n| n.is_empty()) {
            return Err(format!(
                "namespaces.names: {name:?} is not a namespace name; remove it (an empty list watches every namespace)"
            ));
        }
        let methods: Vec<&str> = [
            ("basic_auth", self.basic_auth.is_some()),
            ("authorization", self.authorization.is_some()),
            ("bearer_token", self.bearer_token.is_some()),
            ("bearer_token_file", self.bearer_token_file.is_some()),
        ]
        .into_iter()
        .filter_map(|(name, set)| set.then_some(name))
        .collect();
        if methods.len() > 1 {
            return Err(format!(
                "{} are all set, but only one authentication method can be used; keep one",
                methods.join(", ")
            ));
        }
        if let Some(b) = &self.basic_auth {
            if b.password.is_some() && b.password_file.is_some() {
                return Err("basic_auth: password and password_file are both set; keep one".into());
            }
            if b.username.is_some() == b.username_file.is_some() {
                return Err("basic_auth: give one of username and username_file".into());
            }
        }
        if let Some(a) = &self.authorization {
            if a.credentials.is_some() && a.credentials_file.is_some() {
                return Err(
                    "authorization: credentials and credentials_file are both set; keep one".into(),
                );
            }
            if a.kind
                .as_deref()
                .is_some_and(|k| k.eq_ignore_ascii_case("basic"))
            {
                return Err(
                    "authorization: type Basic is not allowed here; use basic_auth instead".into(),
                );
            }
        }
        if let Some(t) = &self.tls_config
            && t.cert_file.is_some() != t.key_file.is_some()
        {
            return Err(
                "tls_config: cert_file and key_file go together; give both or neither".into(),
            );
        }
        let allowed = self.role.selector_roles();
        let mut seen = Vec::new();
        for s in &self.selectors {
            if seen.contains(&s.role) {
                return Err(format!("duplicated selector role: {}", s.role));
            }
            seen.push(s.role);
            if !allowed.contains(&s.role) {
                let names: Vec<&str> = allowed.iter().map(|r| r.as_str()).collect();
                return Err(format!(
                    "{} role supports only {} selectors",
                    self.role,
                    names.join(", ")
                ));
            }
            for (what, sel) in [("label", &s.label), ("field", &s.field)] {
                if let Some(sel) = sel
                    && let Err(m) = check_selector(sel)
                {
                    return Err(format!("selectors ({} role): {what} {sel:?}: {m}", s.role));
                }
            }
        }
        Ok(())
    }

    /// The label and field selectors for the objects of `role`, as given in `selectors`.
    pub fn selector_for(&self, role: KubernetesRole) -> Option<&KubernetesSelector> {
        self.selectors.iter().find(|s| s.role == role)
    }

    /// Makes every file path relative to `base` (the config file's directory), as
    /// Prometheus does.
    pub fn resolve_paths(&mut self, base: &Path) {
        let join = |p: &mut Option<PathBuf>| {
            if let Some(p) = p
                && p.is_relative()
            {
                *p = base.join(&*p);
            }
        };
        join(&mut self.kubeconfig_file);
        join(&mut self.bearer_token_file);
        if let Some(b) = &mut self.basic_auth {
            join(&mut b.username_file);
            join(&mut b.password_file);
        }
        if let Some(a) = &mut self.authorization {
            join(&mut a.credentials_file);
        }
        if let Some(t) = &mut self.tls_config {
            join(&mut t.ca_file);
            join(&mut t.cert_file);
            join(&mut t.key_file);
        }
    }
}

/// A light syntax check of a label or field selector (`k=v,k2!=v2,k3 in (a,b),!k4`): the
/// API server has the last word, but a typo found here is reported with the config's
/// file and line instead of as a 400 every few seconds.
fn check_selector(sel: &str) -> Result<(), &'static str> {
    let mut depth = 0i32;
    for c in sel.chars() {
        match c {
            '(' => depth += 1,
            ')' => depth -= 1,
            _ => {}
        }
        if !(0..=1).contains(&depth) {
            return Err("unbalanced parentheses");
        }
    }
    if depth != 0 {
        return Err("unbalanced parentheses");
    }
    if sel.trim_start().starts_with(',') || sel.trim_end().ends_with(',') || sel.contains(",,") {
        return Err("empty requirement between commas");
    }
    Ok(())
}

/// True for an `http://` or `https://` URL with a host.
fn is_http_url(url: &str) -> bool {
    let Some(rest) = url
        .strip_prefix("https://")
        .or_else(|| url.strip_prefix("http://"))
    else {
        return false;
    };
    let host = rest.split(['/', '?', '#']).next().unwrap_or("");
    !host.is_empty() && !host.contains(char::is_whitespace)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(yaml: &str) -> Result<KubernetesSdConfig, String> {
        let cfg: KubernetesSdConfig =
            crate::config::from_yaml_str(Path::new("k.yml"), yaml).map_err(|e| e.to_string())?;
        cfg.validate()?;
        Ok(cfg)
    }

    #[test]
    fn prometheus_fields_and_defaults() {
        let cfg = parse(
            "role: endpoints\napi_server: https://10.0.0.1:6443\nnamespaces: {names: [web, shop]}\nselectors:\n  - {role: pod, label: 'app=web,tier!=db'}\n  - {role: service, field: 'metadata.name=web'}\nbearer_token_file: token\ntls_config: {ca_file: ca.crt, insecure_skip_verify: false}\n",
        )
        .unwrap();
        assert_eq!(cfg.role, KubernetesRole::Endpoints);
        assert_eq!(cfg.namespaces.names, ["web", "shop"]);
        assert_eq!(
            cfg.selector_for(KubernetesRole::Pod)
                .unwrap()
                .label
                .as_deref(),
            Some("app=web,tier!=db")
        );
        let in_cluster = parse("role: ingress\n").unwrap();
        assert!(in_cluster.api_server.is_none() && in_cluster.namespaces.names.is_empty());
        assert_eq!(
            parse("role: endpointslice").unwrap().role,
            KubernetesRole::EndpointSlice
        );
    }

    #[test]
    fn prometheus_rules_refuse_what_it_refuses() {
        let refused = |yaml: &str, needle: &str| {
            let e = parse(yaml).unwrap_err();
            assert!(e.contains(needle), "{yaml:?}: {e}");
        };
        refused("api_server: https://k\n", "role");
        refused("role: deployment\n", "deployment");
        refused(
            "role: pod\napi_server: https://k\nkubeconfig_file: kc\n",
            "simultaneously",
        );
        refused(
            "role: pod\nkubeconfig_file: kc\nbearer_token: t\n",
            "kubeconfig_file",
        );
        refused(
            "role: pod\nbearer_token_file: t\n",
            "'api_server' URL explicitly",
        );
        refused(
            "role: pod\napi_server: https://k\nnamespaces: {own_namespace: true}\n",
            "own_namespace",
        );
        refused(
            "role: service\nselectors: [{role: pod, label: a=b}]\n",
            "service role supports only service selectors",
        );
        refused(
            "role: pod\nselectors: [{role: pod, label: a=b}, {role: pod, field: x=y}]\n",
            "duplicated selector role: pod",
        );
        refused(
            "role: pod\nselectors: [{role: pod, label: 'app in (a,b'}]\n",
            "unbalanced",
        );
        refused("role: pod\napi_server: 'kubernetes:443'\n", "not an http");
        refused(
            "role: pod\napi_server: https://k\nbearer_token: a\nbasic_auth: {username: u}\n",
            "only one authentication method",
        );
        refused(
            "role: pod\napi_server: https://k\ntls_config: {cert_file: c}\n",
            "go together",
        );
        refused("role: pod\nproxy_url: http://p\n", "proxy_url");
        refused(
            "role: pod\nattach_metadata: {node: true}\n",
            "attach_metadata",
        );
    }

    #[test]
    fn relative_paths_follow_the_config_file() {
        let mut cfg = parse(
            "role: pod\napi_server: https://k\nbearer_token_file: tok\ntls_config: {ca_file: /etc/ca.crt}\n",
        )
        .unwrap();
        cfg.resolve_paths(Path::new("/etc/sonde"));
        assert_eq!(
            cfg.bearer_token_file.as_deref(),
            Some(Path::new("/etc/sonde/tok"))
        );
        assert_eq!(
            cfg.tls_config.unwrap().ca_file.as_deref(),
            Some(Path::new("/etc/ca.crt"))
        );
    }

    #[test]
    fn secrets_are_never_printed() {
        let cfg = parse("role: pod\napi_server: https://k\nbearer_token: hunter2\n").unwrap();
        assert!(!format!("{cfg:?}").contains("hunter2"));
        assert!(!serde_json::to_string(&cfg).unwrap().contains("hunter2"));
    }
}
