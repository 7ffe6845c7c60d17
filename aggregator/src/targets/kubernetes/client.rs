//! The API client one `kubernetes_sd_configs` entry uses: the in-cluster service account
//! by default, else its `kubeconfig_file`, else its `api_server` with the HTTP client
//! options (authentication, `tls_config`), as Prometheus chooses.

use http::{HeaderValue, header::AUTHORIZATION};
use kube::config::{KubeConfigOptions, Kubeconfig};
use sonde_proto::config::discovery::kubernetes::{KubernetesSdConfig, is_bearer};
use std::path::{Path, PathBuf};

/// Where a pod finds the namespace it runs in.
const OWN_NAMESPACE_FILE: &str = "/var/run/secrets/kubernetes.io/serviceaccount/namespace";

/// Why no client could be made; the message says what to change.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error(
        "no api_server and no kubeconfig_file, and not running in a pod ({0}); give api_server or kubeconfig_file, or run the aggregator in the cluster with a service account"
    )]
    NotInCluster(kube::config::InClusterError),
    #[error("kubeconfig_file {}: {source}", path.display())]
    Kubeconfig {
        path: PathBuf,
        source: kube::config::KubeconfigError,
    },
    #[error("api_server {url:?} is not a valid URL: {source}")]
    Url {
        url: String,
        source: http::uri::InvalidUri,
    },
    #[error("{what} {}: cannot read: {source}", path.display())]
    Read {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{0}: the credential has characters not allowed in an HTTP header")]
    BadCredential(&'static str),
    #[error("namespaces.own_namespace: cannot read {OWN_NAMESPACE_FILE}: {0}")]
    OwnNamespace(std::io::Error),
    #[error("cannot make the API client for {url}: {source}")]
    Client { url: String, source: kube::Error },
}

/// A client, the API server's URL (for logs) and the namespaces to watch (`None`: all).
pub struct Connection {
    pub client: kube::Client,
    pub url: String,
    pub namespaces: Option<Vec<String>>,
}

pub async fn connect(sd: &KubernetesSdConfig) -> Result<Connection, ClientError> {
    let config = if let Some(path) = &sd.kubeconfig_file {
        let kubeconfig = Kubeconfig::read_from(path).map_err(|source| ClientError::Kubeconfig {
            path: path.clone(),
            source,
        })?;
        kube::Config::from_custom_kubeconfig(kubeconfig, &KubeConfigOptions::default())
            .await
            .map_err(|source| ClientError::Kubeconfig {
                path: path.clone(),
                source,
            })?
    } else if let Some(url) = &sd.api_server {
        api_server_config(sd, url)?
    } else {
        kube::Config::incluster().map_err(ClientError::NotInCluster)?
    };
    let url = config.cluster_url.to_string();
    let mut namespaces = sd.namespaces.names.clone();
    if sd.namespaces.own_namespace {
        let own = std::fs::read_to_string(OWN_NAMESPACE_FILE).map_err(ClientError::OwnNamespace)?;
        let own = own.trim();
        if own.is_empty() {
            return Err(ClientError::OwnNamespace(std::io::Error::other(
                "the file is empty",
            )));
        }
        namespaces.push(own.to_string());
    }
    // The client's TLS takes the process's default provider: make it ring (the only one
    // built in) explicitly rather than depend on the crate features that pick it.
    let _ = rustls::crypto::ring::default_provider().install_default();
    let client = kube::Client::try_from(config).map_err(|source| ClientError::Client {
        url: url.clone(),
        source,
    })?;
    Ok(Connection {
        client,
        url,
        namespaces: (!namespaces.is_empty()).then_some(namespaces),
    })
}

fn read(what: &'static str, path: &Path) -> Result<String, ClientError> {
    std::fs::read_to_string(path)
        .map(|s| s.trim().to_string())
        .map_err(|source| ClientError::Read {
            what,
            path: path.to_path_buf(),
            source,
        })
}

fn header(what: &'static str, value: String) -> Result<HeaderValue, ClientError> {
    let mut v = HeaderValue::try_from(value).map_err(|_| ClientError::BadCredential(what))?;
    v.set_sensitive(true);
    Ok(v)
}

/// An explicit `api_server` with Prometheus's HTTP client options. Token files are
/// handed to the client by path, so that a rotated token is picked up.
fn api_server_config(sd: &KubernetesSdConfig, url: &str) -> Result<kube::Config, ClientError> {
    let uri = url.parse().map_err(|source| ClientError::Url {
        url: url.to_string(),
        source,
    })?;
    let mut config = kube::Config::new(uri);
    if let Some(file) = &sd.bearer_token_file {
        config.auth_info.token_file = Some(file.to_string_lossy().into_owned());
    }
    if let Some(token) = &sd.bearer_token {
        let value = header("bearer_token", format!("Bearer {}", token.0))?;
        config.headers.push((AUTHORIZATION, value));
    }
    if let Some(a) = &sd.authorization {
        match (&a.credentials, &a.credentials_file) {
            (None, Some(file)) if is_bearer(a) => {
                config.auth_info.token_file = Some(file.to_string_lossy().into_owned());
            }
            (credentials, file) => {
                let credentials = match (credentials, file) {
                    (Some(c), _) => c.0.clone(),
                    (None, Some(f)) => read("authorization.credentials_file", f)?,
                    (None, None) => String::new(),
                };
                let kind = a.kind.as_deref().unwrap_or("Bearer");
                let value = header("authorization", format!("{kind} {credentials}"))?;
                config.headers.push((AUTHORIZATION, value));
            }
        }
    }
    if let Some(b) = &sd.basic_auth {
        use base64::Engine as _;
        let password = match (&b.password, &b.password_file) {
            (Some(p), _) => p.0.clone(),
            (None, Some(f)) => read("basic_auth.password_file", f)?,
            (None, None) => String::new(),
        };
        let username = match (&b.username, &b.username_file) {
            (Some(u), _) => u.clone(),
            (None, Some(f)) => read("basic_auth.username_file", f)?,
            (None, None) => String::new(),
        };
        let encoded =
            base64::engine::general_purpose::STANDARD.encode(format!("{username}:{password}"));
        config.headers.push((
            AUTHORIZATION,
            header("basic_auth", format!("Basic {encoded}"))?,
        ));
    }
    if let Some(tls) = &sd.tls_config {
        let path = |p: &PathBuf| p.to_string_lossy().into_owned();
        if let Some(ca) = &tls.ca_file {
            // Checked now so that a typo is reported once, clearly, instead of as a TLS
            // failure on every request; the client re-reads the file as it rotates.
            read("tls_config.ca_file", ca)?;
            config.root_cert_file = Some(ca.clone());
        }
        config.auth_info.client_certificate = tls.cert_file.as_ref().map(path);
        config.auth_info.client_key = tls.key_file.as_ref().map(path);
        config.tls_server_name = tls.server_name.clone();
        config.accept_invalid_certs = tls.insecure_skip_verify;
    }
    Ok(config)
}
