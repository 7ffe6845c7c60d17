//! The Authorization header of every request: `basic_auth`, `authorization` or the
//! bearer token, with their files read at each probe so that rotated secrets are
//! picked up.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use http::header::HeaderValue;
use sonde_proto::config::module::HttpProbe;

/// Why the credentials cannot be sent.
#[derive(Debug, thiserror::Error)]
pub(crate) enum AuthError {
    /// A secret's file cannot be read; `what` names the option.
    #[error("http.{what} {path}: {error}")]
    File {
        what: &'static str,
        path: String,
        error: std::io::Error,
    },
    #[error("http: the credentials are not a valid header value")]
    NotAHeaderValue,
}

/// The Authorization value from basic_auth, authorization or the bearer token; files are
/// read at each probe so that rotated secrets are picked up.
pub(crate) fn authorization(cfg: &HttpProbe) -> Result<Option<HeaderValue>, AuthError> {
    let read = |path: &str, what: &'static str| {
        std::fs::read_to_string(path)
            .map(|s| s.trim().to_string())
            .map_err(|error| AuthError::File {
                what,
                path: path.to_string(),
                error,
            })
    };
    let value = if let Some(auth) = &cfg.basic_auth {
        let password = match (&auth.password, &auth.password_file) {
            (_, Some(path)) => read(path, "basic_auth.password_file")?,
            (Some(p), None) => p.clone(),
            (None, None) => String::new(),
        };
        basic(&auth.username, &password)
    } else if let Some(auth) = &cfg.authorization {
        let credentials = match (&auth.credentials, &auth.credentials_file) {
            (_, Some(path)) => read(path, "authorization.credentials_file")?,
            (Some(c), None) => c.clone(),
            (None, None) => String::new(),
        };
        format!("{} {credentials}", auth.kind)
    } else if let Some(token) = &cfg.bearer_token {
        format!("Bearer {token}")
    } else if let Some(path) = &cfg.bearer_token_file {
        format!("Bearer {}", read(path, "bearer_token_file")?)
    } else {
        return Ok(None);
    };
    let mut value = HeaderValue::from_str(&value).map_err(|_| AuthError::NotAHeaderValue)?;
    value.set_sensitive(true);
    Ok(Some(value))
}

/// The Basic scheme's value: `Basic base64(user:password)`.
pub(super) fn basic(user: &str, password: &str) -> String {
    format!("Basic {}", STANDARD.encode(format!("{user}:{password}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn basic_credentials_are_base64_with_padding() {
        // RFC 7617's example, and RFC 4648's padding cases.
        assert_eq!(
            basic("Aladdin", "open sesame"),
            "Basic QWxhZGRpbjpvcGVuIHNlc2FtZQ=="
        );
        assert_eq!(basic("user", "s3cr3t"), "Basic dXNlcjpzM2NyM3Q=");
        assert_eq!(basic("", ""), "Basic Og==");
        assert_eq!(basic("f", ""), "Basic Zjo=");
    }
}
