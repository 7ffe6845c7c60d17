//! blackbox_exporter's `unix` module: connect to a unix domain socket (the target is its
//! path), optionally over TLS, then run the `query_response` dialogue as tcp does.

use super::{ModuleError, QueryResponse, TlsConfig, check_tls};
use serde::{Deserialize, Serialize};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UnixProbe {
    /// Lines to expect and send, in order, after connecting.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub query_response: Vec<QueryResponse>,
    /// TLS from the first byte.
    #[serde(default)]
    pub tls: bool,
    /// `server_name` is required with `tls` (a socket path names no host), unless
    /// `insecure_skip_verify`.
    #[serde(default)]
    pub tls_config: TlsConfig,
}

impl UnixProbe {
    pub fn is_default(&self) -> bool {
        *self == Self::default()
    }

    pub(super) fn validate(&self) -> Result<(), ModuleError> {
        check_tls("unix", &self.tls_config)?;
        check_query_response("unix", &self.query_response)?;
        let needs_tls = self.tls || self.query_response.iter().any(|qr| qr.starttls);
        if needs_tls
            && self.tls_config.server_name.is_none()
            && !self.tls_config.insecure_skip_verify
        {
            return Err(ModuleError::Option {
                option: "unix.tls_config.server_name".into(),
                problem: "a socket path names no host to verify the certificate against: set server_name to the name in the server's certificate (or insecure_skip_verify: true)".into(),
            });
        }
        Ok(())
    }
}

/// The checks of a `query_response` list that serde cannot make, for `prober`'s section.
pub(super) fn check_query_response(
    prober: &str,
    steps: &[QueryResponse],
) -> Result<(), ModuleError> {
    for (step, qr) in steps.iter().enumerate() {
        let option = |field: &str| format!("{prober}.query_response[{step}]{field}");
        if qr.expect.is_some() && qr.expect_bytes.is_some() {
            return Err(ModuleError::Option {
                option: option(""),
                problem: "expect and expect_bytes are mutually exclusive, keep one".into(),
            });
        }
        if let Some(re) = &qr.expect {
            regex::Regex::new(re).map_err(|error| ModuleError::Regex {
                option: option(".expect"),
                pattern: re.clone(),
                error,
            })?;
        }
        if !qr.labels.is_empty() && qr.expect.is_none() {
            return Err(ModuleError::Option {
                option: option(".labels"),
                problem: "labels take their values from expect's match, set expect".into(),
            });
        }
        for label in &qr.labels {
            if !crate::config::is_valid_label_name(&label.name) {
                return Err(ModuleError::Option {
                    option: option(".labels"),
                    problem: format!("{:?} is not a valid label name", label.name),
                });
            }
        }
    }
    Ok(())
}
