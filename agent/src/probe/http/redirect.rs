//! Following redirects as Go's http.Client does: which responses redirect, and the
//! request that follows one (method, body, Host, server name, and whether credentials
//! still go along).

use super::{authority, url_host};
use bytes::Bytes;
use http::header;
use http::{Method, Response, StatusCode};
use hyper::body::Incoming;
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
    /// False once a redirect leaves the first host: credentials are not sent there.
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
        let same_site =
            self.same_site && (host == first_host || host.ends_with(&format!(".{first_host}")));
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

/// The next URL when the response is a redirect Go's client would follow: 301, 302,
/// 303, 307 or 308 with a usable Location.
pub(super) fn redirect_location(resp: &Response<Incoming>, base: &Url) -> Option<Url> {
    if !matches!(resp.status().as_u16(), 301 | 302 | 303 | 307 | 308) {
        return None;
    }
    let location = resp.headers().get(header::LOCATION)?.to_str().ok()?;
    if location.is_empty() {
        return None;
    }
    base.join(location).ok()
}
