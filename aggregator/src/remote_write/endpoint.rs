//! Where an endpoint's requests go: its URL taken apart once, checked when the config is
//! and used by the client for every connection.

use super::setting::{SettingError, invalid};

/// Where requests go, taken apart once from the configured URL.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Endpoint {
    pub(crate) https: bool,
    /// Without IPv6 brackets: what to resolve and what to check the certificate against.
    pub(crate) host: String,
    pub(crate) port: u16,
    /// The `Host` header: host and port as the URL wrote them.
    pub(crate) authority: String,
    pub(crate) path_and_query: String,
}

impl Endpoint {
    pub(crate) fn parse(url: &str) -> Result<Self, SettingError> {
        let uri: http::Uri = url.parse().map_err(|e| {
            invalid(format!("url: {url:?} is not a valid URL ({e}); expected like http://127.0.0.1:9090/api/v1/write"))
        })?;
        let https = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => {
                return Err(invalid(format!(
                    "url: {url:?} must start with http:// or https://, like http://127.0.0.1:9090/api/v1/write"
                )));
            }
        };
        let authority = uri
            .authority()
            .ok_or_else(|| invalid(format!("url: {url:?} has no host")))?;
        if authority.as_str().contains('@') {
            return Err(invalid(format!(
                "url: credentials in the URL are not supported; move them to basic_auth and remove them from {url:?}"
            )));
        }
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if host.is_empty() {
            return Err(invalid(format!("url: {url:?} has no host")));
        }
        Ok(Self {
            https,
            host: host.to_string(),
            port: authority.port_u16().unwrap_or(if https { 443 } else { 80 }),
            authority: authority.as_str().to_string(),
            path_and_query: uri
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_else(|| "/".to_string()),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_parsing() {
        let e = Endpoint::parse("https://[::1]:8443/api/v1/push?x=1").unwrap();
        assert_eq!(
            (e.https, e.host.as_str(), e.port, e.authority.as_str()),
            (true, "::1", 8443, "[::1]:8443")
        );
        assert_eq!(e.path_and_query, "/api/v1/push?x=1");
        let e = Endpoint::parse("http://prom:9090").unwrap();
        assert_eq!((e.port, e.path_and_query.as_str()), (9090, "/"));
        assert_eq!(Endpoint::parse("https://mimir/push").unwrap().port, 443);
        assert!(Endpoint::parse("prom:9090/write").is_err());
    }
}
