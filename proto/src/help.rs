//! HELP texts of the series sonde writes, in one place for every output (`/metrics`,
//! `/probe`, remote write 2.0 metadata). Probe series are worded as blackbox_exporter
//! words them, so dashboards and tooltips read the same.

/// Every metric the probers produce. An aggregator accepts no other name from an agent,
/// so a hostile agent cannot write `up`, `sonde_*` or series of its own invention.
pub const PROBE_METRICS: &[&str] = &[
    "probe_dns_additional_rrs",
    "probe_dns_answer_rrs",
    "probe_dns_authority_rrs",
    "probe_dns_dnssec_ad",
    "probe_dns_dnssec_valid",
    "probe_dns_duration_seconds",
    "probe_dns_lookup_time_seconds",
    "probe_dns_query_succeeded",
    "probe_dns_rrsig_expiry_timestamp_seconds",
    "probe_dns_serial",
    "probe_duration_seconds",
    "probe_expect_info",
    "probe_failed_due_to_bytes",
    "probe_failed_due_to_cel",
    "probe_failed_due_to_regex",
    "probe_failure_info",
    "probe_grpc_duration_seconds",
    "probe_grpc_healthcheck_response",
    "probe_grpc_ssl",
    "probe_grpc_status_code",
    "probe_http_content_length",
    "probe_http_duration_seconds",
    "probe_http_last_modified_timestamp_seconds",
    "probe_http_redirects",
    "probe_http_ssl",
    "probe_http_status_code",
    "probe_http_uncompressed_body_length",
    "probe_http_version",
    "probe_icmp_duration_seconds",
    "probe_icmp_reply_hop_limit",
    "probe_ip_addr_hash",
    "probe_ip_protocol",
    "probe_multihttp_step_duration_seconds",
    "probe_multihttp_step_status_code",
    "probe_multihttp_step_success",
    "probe_resolved_addresses",
    "probe_retries",
    "probe_ssl_earliest_cert_expiry",
    "probe_ssl_last_chain_expiry_timestamp_seconds",
    "probe_ssl_last_chain_info",
    "probe_success",
    "probe_tls_cipher_info",
    "probe_tls_version_info",
    "probe_websocket_connection_upgraded",
    "probe_websocket_duration_seconds",
    "probe_websocket_failed_due_to_regex",
    "probe_websocket_status_code",
];

/// True for a metric name the probers can produce ([`PROBE_METRICS`]).
pub fn is_probe_metric(name: &str) -> bool {
    PROBE_METRICS.binary_search(&name).is_ok()
}

/// The HELP text of a series sonde writes; `None` for a name it does not write.
pub fn series_help(name: &str) -> Option<&'static str> {
    Some(match name {
        "up" => {
            "1 if enough agents with a fresh result succeed (quorum), 0 if not; absent when no agent has a fresh result."
        }
        "probe_success" => "Displays whether or not the probe was a success",
        "probe_duration_seconds" => "Returns how long the probe took to complete in seconds",
        "probe_dns_lookup_time_seconds" => "Returns the time taken for probe dns lookup in seconds",
        "probe_ip_protocol" => "Specifies whether probe ip protocol is IP4 or IP6",
        "probe_resolved_addresses" => {
            "Addresses the target's name resolved to (per_address modules; at most max_addresses of them are probed)"
        }
        "probe_ip_addr_hash" => {
            "Specifies the hash of IP address. It's useful to detect if the IP address changes."
        }
        "probe_http_status_code" => "Response HTTP status code",
        "probe_multihttp_step_success" => {
            "Whether the step of a multihttp check succeeded (absent for steps not reached)"
        }
        "probe_multihttp_step_duration_seconds" => "How long the step of a multihttp check took",
        "probe_multihttp_step_status_code" => {
            "HTTP status code of the step's final response (0: no response)"
        }
        "probe_http_duration_seconds" => {
            "Duration of http request by phase, summed over all redirects"
        }
        "probe_http_content_length" => "Length of http content response",
        "probe_http_uncompressed_body_length" => "Length of uncompressed response body",
        "probe_http_redirects" => "The number of redirects",
        "probe_http_ssl" => "Indicates if SSL was used for the final redirect",
        "probe_http_version" => "Returns the version of HTTP of the probe response",
        "probe_http_last_modified_timestamp_seconds" => {
            "Returns the Last-Modified HTTP response header in unixtime"
        }
        "probe_failed_due_to_regex" => "Indicates if probe failed due to regex",
        "probe_failed_due_to_cel" => "Indicates if probe failed due to CEL expression not matching",
        "probe_websocket_connection_upgraded" => {
            "Indicates if the connection was upgraded to a websocket"
        }
        "probe_websocket_duration_seconds" => "Duration of the websocket probe by phase",
        "probe_websocket_failed_due_to_regex" => "Indicates if probe failed due to regex",
        "probe_websocket_status_code" => "Response HTTP status code of the websocket upgrade",
        "probe_ssl_earliest_cert_expiry" => "Returns last SSL chain expiry in unixtime",
        "probe_ssl_last_chain_expiry_timestamp_seconds" => {
            "Returns last SSL chain expiry in timestamp"
        }
        "probe_ssl_last_chain_info" => "Contains SSL leaf certificate information",
        "probe_tls_version_info" => "Returns the TLS version used or NaN when unknown",
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
        "probe_dns_serial" => "Returns the serial number of the zone",
        "probe_dns_dnssec_valid" => {
            "1 if the agent validated the answer's DNSSEC chain of trust from a trust anchor (sonde)"
        }
        "probe_dns_dnssec_ad" => {
            "1 if the server set the AD (authentic data) flag on the answer (sonde)"
        }
        "probe_dns_rrsig_expiry_timestamp_seconds" => {
            "Earliest expiry of the RRSIGs on the answer's chain of trust, in unixtime (sonde)"
        }
        "probe_failure_info" => "Why the probe failed, one bounded reason (sonde)",
        "probe_failed_due_to_bytes" => "Indicates if probe failed due to bytes",
        "probe_expect_info" => "Explicit content matched",
        "probe_tls_cipher_info" => "Returns the TLS cipher negotiated during handshake",
        "probe_retries" => "Retries used before this result (sonde)",
        "probe_icmp_duration_seconds" => "Duration of icmp request by phase",
        "probe_icmp_reply_hop_limit" => "Replied packet hop limit (TTL for ipv4)",
        "probe_grpc_duration_seconds" => "Duration of gRPC request by phase",
        "probe_grpc_ssl" => "Indicates if SSL was used for the connection",
        "probe_grpc_status_code" => "Response gRPC status code",
        "probe_grpc_healthcheck_response" => "Response HealthCheck response",
        "sonde_target_agents" => "Agents with a fresh result for the target.",
        "sonde_target_in_maintenance" => {
            "1 while a maintenance window covers the target, 0 outside; only for targets some window selects."
        }
        "sonde_target_agents_succeeding" => "Agents whose fresh result for the target succeeded.",
        "sonde_job_missing" => {
            "1 while the job is expected but no agent has a fresh result for any of its targets."
        }
        "sonde_job_targets" => "Targets of the job.",
        "sonde_agent_up" => {
            "1 while the agent is connected (or within fleet.missing_after of its last contact)."
        }
        "sonde_agent_last_seen_timestamp_seconds" => "When the agent was last heard from.",
        "sonde_agent_info" => "The agent's labels, for joins in PromQL.",
        "sonde_agent_in_maintenance" => {
            "1 while a maintenance window covers the agent (its results do not count toward up), 0 outside; only for agents some window selects."
        }
        "sonde_agent_clock_skew_seconds" => {
            "The agent's clock minus the aggregator's, from its last heartbeat (network delay included)."
        }
        other if other.starts_with("probe_") => {
            "Probe metric, as blackbox_exporter defines it, per agent."
        }
        other if other.starts_with("sonde_") => "sonde series.",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_and_unknown_names() {
        assert_eq!(
            series_help("probe_success"),
            Some("Displays whether or not the probe was a success")
        );
        assert!(series_help("probe_something_new").is_some());
        assert_eq!(series_help("node_load1"), None);
    }

    #[test]
    fn probe_metrics_are_sorted_and_have_help() {
        assert!(PROBE_METRICS.windows(2).all(|w| w[0] < w[1]));
        for name in PROBE_METRICS {
            assert!(is_probe_metric(name));
            assert_ne!(
                series_help(name),
                series_help("probe_something_new"),
                "{name} has its own HELP text"
            );
        }
        assert!(!is_probe_metric("up"));
        assert!(!is_probe_metric("probe_something_new"));
    }
}
