//! Cookies set by redirect responses, sent on the next hops to the same host: the
//! login-redirect pattern that blackbox_exporter's cookie jar supports.

use super::url_host;
use http::header::{self, HeaderMap, HeaderValue};
use url::Url;

/// `(host, "name=value")` pairs, at most [`CookieJar::MAX_COOKIES`] of them.
#[derive(Debug, Default)]
pub(super) struct CookieJar {
    cookies: Vec<(String, String)>,
}

impl CookieJar {
    /// Bounded: a hostile target could set thousands over ten redirects.
    const MAX_COOKIES: usize = 50;

    /// Keeps the cookies a response from `url` sets, replacing those of the same name.
    pub(super) fn keep(&mut self, url: &Url, headers: &HeaderMap) {
        let host = url_host(url).unwrap_or_default();
        for value in headers.get_all(header::SET_COOKIE) {
            let Some(pair) = value.to_str().ok().and_then(|v| v.split(';').next()) else {
                continue;
            };
            let pair = pair.trim();
            let Some((name, _)) = pair.split_once('=') else {
                continue;
            };
            self.cookies
                .retain(|(h, c)| !(*h == host && c.split_once('=').map(|(n, _)| n) == Some(name)));
            if self.cookies.len() < Self::MAX_COOKIES {
                self.cookies.push((host.clone(), pair.to_string()));
            }
        }
    }

    /// The Cookie header for a request to `host`, when it has cookies.
    pub(super) fn header(&self, host: &str) -> Option<HeaderValue> {
        let jar: Vec<&str> = self
            .cookies
            .iter()
            .filter(|(h, _)| h == host)
            .map(|(_, c)| c.as_str())
            .collect();
        if jar.is_empty() {
            return None;
        }
        HeaderValue::from_str(&jar.join("; ")).ok()
    }
}
