//! Prometheus's `oauth2` block of an HTTP client config: the client-credentials grant,
//! whose token the http prober fetches from `token_url` and sends as a bearer token.

use super::TlsConfig;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OAuth2 {
    pub client_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret: Option<String>,
    /// Read at every token request; surrounding whitespace is trimmed, as Prometheus does.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_secret_file: Option<String>,
    /// Sent space-separated as the `scope` parameter.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub scopes: Vec<String>,
    pub token_url: String,
    /// Extra form parameters of the token request; `grant_type` may replace
    /// `client_credentials`, as Go's oauth2 package allows.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub endpoint_params: BTreeMap<String, String>,
    /// The TLS settings of the connection to `token_url`.
    #[serde(default)]
    pub tls_config: TlsConfig,
}

/// Why an `oauth2` block cannot work.
#[derive(Clone, Debug, PartialEq, thiserror::Error)]
pub enum OAuth2Error {
    #[error("http.oauth2: set client_secret or client_secret_file, not both")]
    SecretTwice,
    #[error("http.oauth2.token_url: {url:?} is not an http:// or https:// URL{why}")]
    TokenUrl { url: String, why: String },
    #[error(
        "http.oauth2.endpoint_params: {0:?} is set by the grant itself; only grant_type may be replaced"
    )]
    ReservedParam(String),
}

impl OAuth2 {
    pub fn validate(&self) -> Result<(), OAuth2Error> {
        if self.client_secret.is_some() && self.client_secret_file.is_some() {
            return Err(OAuth2Error::SecretTwice);
        }
        let bad = |why: String| OAuth2Error::TokenUrl {
            url: self.token_url.clone(),
            why,
        };
        let lower = self.token_url.to_ascii_lowercase();
        let Some(rest) = ["http://", "https://"]
            .iter()
            .find_map(|scheme| lower.strip_prefix(scheme))
        else {
            return Err(bad(String::new()));
        };
        if rest
            .split(['/', '?', '#'])
            .next()
            .unwrap_or_default()
            .is_empty()
        {
            return Err(bad(": it has no host".into()));
        }
        for key in self.endpoint_params.keys() {
            if matches!(key.as_str(), "scope" | "client_id" | "client_secret") {
                return Err(OAuth2Error::ReservedParam(key.clone()));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn oauth2(url: &str) -> OAuth2 {
        OAuth2 {
            client_id: "id".into(),
            token_url: url.into(),
            ..OAuth2::default()
        }
    }

    #[test]
    fn token_url_must_be_http() {
        oauth2("https://auth.example/token").validate().unwrap();
        oauth2("http://127.0.0.1:9/token").validate().unwrap();
        for url in ["ftp://auth.example/", "auth.example/token", ""] {
            assert!(
                matches!(oauth2(url).validate(), Err(OAuth2Error::TokenUrl { .. })),
                "{url}"
            );
        }
    }

    #[test]
    fn secret_once_and_grant_params_reserved() {
        let mut both = oauth2("https://a.example/t");
        both.client_secret = Some("s".into());
        both.client_secret_file = Some("/f".into());
        assert_eq!(both.validate(), Err(OAuth2Error::SecretTwice));
        let mut params = oauth2("https://a.example/t");
        params
            .endpoint_params
            .insert("grant_type".into(), "client_credentials".into());
        params.validate().unwrap();
        params.endpoint_params.insert("scope".into(), "x".into());
        assert_eq!(
            params.validate(),
            Err(OAuth2Error::ReservedParam("scope".into()))
        );
    }
}
