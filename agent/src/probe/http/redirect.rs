//! Following redirects as Go's http.Client does: which responses redirect, and the
//! request that follows one (method, body, Host, server name, and whether credentials
//! still go along).
//!
//! Credentials follow Go's rule for its sensitive headers (`makeHeadersCopier` and
//! `shouldCopyHeaderOnRedirect` in net/http, which prometheus/common applies to its
//! `basic_auth`, `authorization` and bearer token too): they go to the first host and
//! to its subdomains, whatever the scheme or port; once a redirect leaves for any other
//! host they are dropped for the rest of the chain, even if a later hop comes back.

use super::{authority, url_host};
use bytes::Bytes;
use http::header::{self, HeaderName};
use http::{Method, Response, StatusCode};
use std::net::IpAddr;
use url::Url;

/// One request of the chain.
pub(super) struct Hop {
    pub(super) url: Url,
    /// Where to connect; `None` means resolve the URL's host.
    pub(super) ip: Option<IpAddr>,
    /// Host (HTTP/1) or :authority (HTTP/2).
    pub(super) host_header: String,
    pub(super) sni: String,
    pub(super) method: Method,
    pub(super) body: Option<Bytes>,
    /// False once a redirect has left the first host and its subdomains: from then on
    /// no credential is sent (see [`is_sensitive`]).
    pub(super) same_site: bool,
}

impl Hop {
    /// The next request after a redirect, as Go's http.Client builds it.
    pub(super) fn follow(self, status: StatusCode, next: Url, first_host: &str) -> Hop {
        // 301/302 turn a POST into a GET and 303 anything but HEAD; only 307/308 resend
        // the body.
        let (method, body) = match status.as_u16() {
            301 | 302 if self.method == Method::POST => (Method::GET, None),
            303 if self.method != Method::HEAD => (Method::GET, None),
            307 | 308 => (self.method, self.body),
            _ => (self.method, None),
        };
        let same_authority = next.scheme() == self.url.scheme()
            && next.host_str() == self.url.host_str()
            && next.port_or_known_default() == self.url.port_or_known_default();
        if same_authority {
            // A relative Location, or one to the same place: same address, same Host
            // header and server name, as Go keeps them for relative redirects.
            return Hop {
                url: next,
                method,
                body,
                ..self
            };
        }
        let host = url_host(&next).unwrap_or_default();
        let same_site = self.same_site && is_domain_or_subdomain(&host, first_host);
        Hop {
            host_header: authority(&next),
            sni: host,
            url: next,
            ip: None,
            method,
            body,
            same_site,
        }
    }
}

/// Go's `isDomainOrSubdomain`: `sub` is `parent` or ends with `.parent`. An IPv6
/// address is never a subdomain. Hosts compare in the lower case the URL parser gives
/// them.
fn is_domain_or_subdomain(sub: &str, parent: &str) -> bool {
    if sub == parent {
        return true;
    }
    !sub.contains([':', '%'])
        && sub.len() > parent.len()
        && sub.ends_with(parent)
        && sub.as_bytes()[sub.len() - parent.len() - 1] == b'.'
}

/// The headers Go's client drops on a redirect that leaves the first host: the
/// Authorization the module's `basic_auth`, `authorization` or bearer token makes, and
/// these when `headers:` sets them.
pub(super) fn is_sensitive(name: &HeaderName) -> bool {
    [
        header::AUTHORIZATION,
        header::WWW_AUTHENTICATE,
        header::COOKIE,
        header::PROXY_AUTHORIZATION,
        header::PROXY_AUTHENTICATE,
    ]
    .contains(name)
        || name.as_str() == "cookie2"
}

/// The next URL when the response is a redirect Go's client would follow: 301, 302,
/// 303, 307 or 308 with a usable Location.
pub(super) fn redirect_location<B>(resp: &Response<B>, base: &Url) -> Option<Url> {
    if !matches!(resp.status().as_u16(), 301 | 302 | 303 | 307 | 308) {
        return None;
    }
    let location = resp.headers().get(header::LOCATION)?.to_str().ok()?;
    if location.is_empty() {
        return None;
    }
    base.join(location).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hop(url: &str) -> Hop {
        let url = Url::parse(url).unwrap();
        Hop {
            host_header: authority(&url),
            sni: url_host(&url).unwrap(),
            url,
            ip: None,
            method: Method::GET,
            body: None,
            same_site: true,
        }
    }

    /// Follows `chain` from `first`, returning whether credentials go to each hop.
    fn credentials_along(first: &str, chain: &[&str]) -> Vec<bool> {
        let mut current = hop(first);
        let first_host = url_host(&current.url).unwrap();
        let mut sent = Vec::new();
        for next in chain {
            current = current.follow(StatusCode::FOUND, Url::parse(next).unwrap(), &first_host);
            sent.push(current.same_site);
        }
        sent
    }

    #[test]
    fn credentials_follow_gos_rule_for_sensitive_headers() {
        // Same host: kept whatever the path, port or scheme, as Go compares host names.
        assert_eq!(
            credentials_along(
                "http://example.com/",
                &[
                    "http://example.com/a",
                    "http://example.com:8080/b",
                    "https://EXAMPLE.com/c"
                ]
            ),
            [true, true, true]
        );
        // A subdomain keeps them; a parent domain, a look-alike or another host does not.
        assert_eq!(
            credentials_along("http://example.com/", &["http://api.example.com/"]),
            [true]
        );
        for other in [
            "http://com/",
            "http://badexample.com/",
            "http://example.com.evil/",
            "http://127.0.0.2/",
        ] {
            assert_eq!(
                credentials_along("http://example.com/", &[other]),
                [false],
                "{other}"
            );
        }
        assert_eq!(
            credentials_along("http://127.0.0.1:8080/", &["http://127.0.0.2:8080/"]),
            [false]
        );
        assert_eq!(
            credentials_along("http://[::1]/", &["http://[::1]:81/", "http://[::2]/"]),
            [true, false]
        );
        // Once dropped, they stay dropped, even back on the first host.
        assert_eq!(
            credentials_along(
                "http://example.com/",
                &["http://other.net/", "http://example.com/"]
            ),
            [false, false]
        );
    }

    #[test]
    fn gos_sensitive_headers() {
        for name in [
            "authorization",
            "www-authenticate",
            "cookie",
            "cookie2",
            "proxy-authorization",
            "proxy-authenticate",
        ] {
            assert!(is_sensitive(&HeaderName::from_static(name)), "{name}");
        }
        assert!(!is_sensitive(&header::USER_AGENT));
        assert!(!is_sensitive(&HeaderName::from_static("x-api-key")));
    }
}
