//! The agent's HTTP endpoints: `/metrics`, `/-/healthy`, `/-/ready`, and the
//! blackbox_exporter-compatible `/probe` when `probe_endpoint.enabled` is set.

use crate::probe;
use crate::runtime::AgentRuntime;
use axum::Router;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sonde_proto::config::{Module, Prober, split_port};
use sonde_proto::exposition::{Family, Format, render};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

pub fn router(agent: Arc<AgentRuntime>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/metrics", get(metrics))
        .route("/-/healthy", get(|| async { "Healthy.\n" }))
        .route("/-/ready", get(|| async { "Ready.\n" }))
        .route("/probe", get(probe_handler))
        .with_state(agent)
}

async fn index(State(agent): State<Arc<AgentRuntime>>) -> impl IntoResponse {
    let config = agent.config();
    let mut text = format!(
        "sonde-agent {} (id {})\n\nChecks:\n",
        env!("CARGO_PKG_VERSION"),
        config.id
    );
    for (source, check) in agent.scheduler.checks() {
        text.push_str(&format!(
            "  {:?}\tjob={}\tinstance={}\tmodule={}\tinterval={:?}\n",
            source, check.job, check.instance, check.module_name, check.interval
        ));
    }
    text.push_str("\nEndpoints: /metrics /probe /-/healthy /-/ready\n");
    text
}

async fn metrics(State(agent): State<Arc<AgentRuntime>>, headers: HeaderMap) -> Response {
    let format = Format::negotiate(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    (
        [(header::CONTENT_TYPE, format.content_type())],
        render(&agent.families(), format),
    )
        .into_response()
}

/// blackbox_exporter subtracts this from the scrape timeout so the answer arrives in time.
const SCRAPE_TIMEOUT_OFFSET: Duration = Duration::from_millis(500);
/// What blackbox_exporter uses when the scraper sends no timeout header.
const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(120);

async fn probe_handler(
    State(agent): State<Arc<AgentRuntime>>,
    Query(params): Query<HashMap<String, String>>,
    headers: HeaderMap,
) -> Response {
    let config = agent.config();
    let settings = &config.probe_endpoint;
    if !settings.enabled {
        return (
            StatusCode::NOT_FOUND,
            "/probe is disabled; set probe_endpoint.enabled: true (with allowed_targets) in the agent config\n",
        )
            .into_response();
    }
    let module_name = params.get("module").map_or("http_2xx", String::as_str);
    let Some(module) = config.modules.get(module_name) else {
        return (
            StatusCode::BAD_REQUEST,
            format!("Unknown module {module_name:?}\n"),
        )
            .into_response();
    };
    if let Some(allowed) = &settings.allowed_modules
        && !allowed.iter().any(|m| m == module_name)
    {
        return (
            StatusCode::FORBIDDEN,
            format!("module {module_name:?} is not in probe_endpoint.allowed_modules\n"),
        )
            .into_response();
    }
    let Some(target) = params.get("target").filter(|t| !t.is_empty()) else {
        return (StatusCode::BAD_REQUEST, "Target parameter is missing\n").into_response();
    };
    if let Err(reason) = allowed_target(&settings.allowed_targets, module, target) {
        return (
            StatusCode::FORBIDDEN,
            format!("target {target:?} refused: {reason}\n"),
        )
            .into_response();
    }
    let timeout = probe_timeout(&headers, module);
    let outcome = probe::run(&agent.probe_context, target, module, timeout).await;
    let debug = params.get("debug").is_some_and(|d| d == "true");
    let mut families: Vec<Family> = Vec::new();
    for sample in &outcome.samples {
        let labels: Vec<(String, String)> = sample
            .labels
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect();
        match families.iter_mut().find(|f| f.name == sample.name) {
            Some(f) => f.samples.push((labels, sample.value)),
            None => families
                .push(Family::gauge(sample.name, help(sample.name)).with(labels, sample.value)),
        }
    }
    let body = render(&families, Format::PrometheusText);
    if debug {
        let log = match &outcome.failure {
            Some(f) => format!("Probe failed: {f}\n"),
            None => "Probe succeeded\n".to_string(),
        };
        return format!(
            "Logs for the probe:\n{log}\n\nMetrics that would have been returned:\n{body}"
        )
        .into_response();
    }
    (
        [(header::CONTENT_TYPE, Format::PrometheusText.content_type())],
        body,
    )
        .into_response()
}

/// HELP texts for the probe metrics, worded as blackbox_exporter words them.
fn help(name: &str) -> &'static str {
    match name {
        "probe_success" => "Displays whether or not the probe was a success",
        "probe_duration_seconds" => "Returns how long the probe took to complete in seconds",
        "probe_dns_lookup_time_seconds" => "Returns the time taken for probe dns lookup in seconds",
        "probe_ip_protocol" => "Specifies whether probe ip protocol is IP4 or IP6",
        "probe_ip_addr_hash" => {
            "Specifies the hash of IP address. It's useful to detect if the IP address changes."
        }
        "probe_http_status_code" => "Response HTTP status code",
        "probe_http_duration_seconds" => {
            "Duration of http request by phase, summed over all redirects"
        }
        "probe_http_content_length" => "Length of http content response",
        "probe_http_uncompressed_body_length" => "Length of uncompressed response body",
        "probe_http_redirects" => "The number of redirects",
        "probe_http_ssl" => "Indicates if SSL was used for the final redirect",
        "probe_http_version" => "Returns the version of HTTP of the probe response",
        "probe_failed_due_to_regex" => "Indicates if probe failed due to regex",
        "probe_ssl_earliest_cert_expiry" => "Returns last SSL chain expiry in unixtime",
        "probe_dns_duration_seconds" => "Duration of DNS request by phase",
        "probe_dns_answer_rrs" => "Returns number of entries in the answer resource record list",
        "probe_dns_authority_rrs" => {
            "Returns number of entries in the authority resource record list"
        }
        "probe_dns_additional_rrs" => {
            "Returns number of entries in the additional resource record list"
        }
        "probe_dns_query_succeeded" => {
            "Displays whether or not the query was executed successfully"
        }
        "probe_retries" => "Retries used before this result (sonde)",
        _ => "Probe metric",
    }
}

fn probe_timeout(headers: &HeaderMap, module: &Module) -> Duration {
    let scrape = headers
        .get("X-Prometheus-Scrape-Timeout-Seconds")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(|s| Duration::from_secs_f64(s).saturating_sub(SCRAPE_TIMEOUT_OFFSET));
    let mut timeout = scrape.unwrap_or(DEFAULT_PROBE_TIMEOUT);
    if !module.timeout.0.is_zero() {
        timeout = timeout.min(module.timeout.0);
    }
    timeout.max(Duration::from_millis(100))
}

/// `/probe` is never an open proxy: the target's `host:port` must match one of the
/// configured glob patterns, and link-local addresses (cloud metadata services) are
/// refused unless a pattern names them without wildcards.
pub fn allowed_target(patterns: &[String], module: &Module, target: &str) -> Result<(), String> {
    let (host, port) = host_port(module.prober, target).ok_or_else(|| {
        format!(
            "cannot tell the host and port of {target:?} for the {} prober",
            module.prober.as_str()
        )
    })?;
    let host_port = if host.contains(':') {
        format!("[{host}]:{port}")
    } else {
        format!("{host}:{port}")
    };
    let explicitly = patterns.contains(&host_port);
    if let Ok(ip) = host.parse::<IpAddr>()
        && is_metadata_address(ip)
        && !explicitly
    {
        return Err(format!(
            "{ip} is a link-local or cloud metadata address; list it in probe_endpoint.allowed_targets explicitly to allow it"
        ));
    }
    for pattern in patterns {
        match globset::GlobBuilder::new(pattern)
            .literal_separator(false)
            .build()
        {
            Ok(glob) if glob.compile_matcher().is_match(&host_port) => return Ok(()),
            _ => {}
        }
    }
    Err(format!(
        "{host_port} matches no pattern of probe_endpoint.allowed_targets"
    ))
}

fn is_metadata_address(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => v4.is_link_local(),
        IpAddr::V6(v6) => {
            v6 == "fd00:ec2::254"
                .parse::<std::net::Ipv6Addr>()
                .unwrap_or(std::net::Ipv6Addr::UNSPECIFIED)
                || (v6.segments()[0] & 0xffc0) == 0xfe80
        }
    }
}

/// The host and port a target reaches, the way each prober reads its target.
fn host_port(prober: Prober, target: &str) -> Option<(String, u16)> {
    match prober {
        Prober::Http => {
            let with_scheme = if target.contains("://") {
                target.to_string()
            } else {
                format!("http://{target}")
            };
            let uri: http::Uri = with_scheme.parse().ok()?;
            let host = uri
                .host()?
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_string();
            let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
                Some("https") => 443,
                _ => 80,
            });
            Some((host, port))
        }
        Prober::Tcp => split_port(target).map(|(h, p)| (h.to_string(), p)),
        Prober::Dns => match split_port(target) {
            Some((h, p)) => Some((h.to_string(), p)),
            None => Some((
                target
                    .trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string(),
                53,
            )),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(prober: &str) -> Module {
        serde_json::from_str(&format!(r#"{{"prober":"{prober}"}}"#)).unwrap()
    }

    #[test]
    fn allowlist() {
        let patterns = vec!["*.internal:443".to_string(), "127.0.0.1:*".to_string()];
        let http = module("http");
        assert!(allowed_target(&patterns, &http, "https://shop.internal/").is_ok());
        assert!(allowed_target(&patterns, &http, "http://shop.internal/").is_err());
        assert!(allowed_target(&patterns, &http, "http://127.0.0.1:8080/x").is_ok());
        assert!(allowed_target(&patterns, &module("tcp"), "10.0.0.1:22").is_err());
        let wide = vec!["*".to_string()];
        let err =
            allowed_target(&wide, &http, "http://169.254.169.254/latest/meta-data").unwrap_err();
        assert!(err.contains("metadata"), "{err}");
        let explicit = vec!["169.254.169.254:80".to_string()];
        assert!(allowed_target(&explicit, &http, "http://169.254.169.254/").is_ok());
        assert!(allowed_target(&wide, &http, "http://[fd00:ec2::254]/").is_err());
    }
}
