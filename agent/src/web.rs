//! The agent's HTTP endpoints: `/metrics`, `/-/healthy`, `/-/ready`, the
//! blackbox_exporter-compatible `/probe` when `probe_endpoint.enabled` is set, and
//! blackbox_exporter's `/logs` (the last probes' debug output, [`crate::probe_logs`]).

use crate::config::AgentConfig;
use crate::probe;
use crate::probe::policy::{BadPattern, ConnectRules};
use crate::probe_logs::Origin;
use crate::runtime::AgentRuntime;
use axum::Router;
use axum::extract::{FromRef, Request, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use sonde_proto::config::Module;
use sonde_proto::exposition::{Family, Format, MetricType, render, write_header, write_sample};
use std::borrow::Cow;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub fn router(agent: Arc<AgentRuntime>) -> Router {
    Router::new()
        .route("/", get(index))
        .route("/metrics", get(metrics))
        .route("/-/healthy", get(|| async { "Healthy.\n" }))
        .route("/-/ready", get(ready))
        .route("/probe", get(probe_handler))
        .route("/logs", get(logs_handler))
        .with_state(WebState {
            agent,
            allowlists: Arc::default(),
        })
}

/// Serves the endpoints on `listener` from a thread of their own (`sonde-web`), on a
/// current-thread runtime, until `shutdown` fires (or its sender is dropped); then shuts
/// down gracefully ([`sonde_cli::http_server::serve`]).
///
/// Why a thread of its own: a `/probe` is a few system calls and a page of text on a
/// keep-alive connection. On one thread, reading the request, probing and answering all
/// run where the connection's events arrive, one `epoll_wait` collects the events of
/// many connections, and no idle worker is woken to steal work: the whole `/probe`
/// request path costs less CPU than on the multi-threaded runtime (docs/benchmarks.md,
/// "`/probe` against the floor"). The uplinks stay on the main runtime and the
/// scheduled checks on their probing threads, so neither waits behind `/probe`.
pub fn serve_on_own_thread(
    listener: std::net::TcpListener,
    agent: Arc<AgentRuntime>,
    limits: sonde_cli::http_server::Limits,
    shutdown: tokio::sync::oneshot::Receiver<()>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    // Registered with the thread's own runtime, the one that will poll it.
    let listener = {
        let _context = runtime.enter();
        tokio::net::TcpListener::from_std(listener)?
    };
    std::thread::Builder::new()
        .name("sonde-web".into())
        .spawn(move || {
            runtime.block_on(sonde_cli::http_server::serve(
                listener,
                router(agent),
                limits,
                async {
                    let _ = shutdown.await;
                },
            ));
        })
}

/// What the handlers share: the agent, and what `/probe` keeps from one request to the
/// next.
#[derive(Clone)]
struct WebState {
    agent: Arc<AgentRuntime>,
    allowlists: Arc<AllowlistCache>,
}

impl FromRef<WebState> for Arc<AgentRuntime> {
    fn from_ref(state: &WebState) -> Self {
        state.agent.clone()
    }
}

/// `probe_endpoint.allowed_targets` of the running config, parsed once per config
/// rather than once per request: a glob pattern compiles to a regex, which costs more
/// than the TCP probe it guards.
#[derive(Default)]
struct AllowlistCache(Mutex<Option<(Arc<AgentConfig>, ParsedAllowlist)>>);

/// `probe_endpoint.allowed_targets` parsed, or why it does not parse.
type ParsedAllowlist = Arc<Result<ConnectRules, BadPattern>>;

impl AllowlistCache {
    fn get(&self, config: &Arc<AgentConfig>) -> ParsedAllowlist {
        let mut cached = self.0.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((parsed_from, allowlist)) = &*cached
            && Arc::ptr_eq(parsed_from, config)
        {
            return allowlist.clone();
        }
        let allowlist = Arc::new(ConnectRules::probe_endpoint(
            &config.probe_endpoint.allowed_targets,
        ));
        *cached = Some((config.clone(), allowlist.clone()));
        allowlist
    }
}

async fn index(State(agent): State<Arc<AgentRuntime>>) -> impl IntoResponse {
    let config = agent.config();
    let mut text = format!(
        "sonde-agent {} (id {})\n\nChecks:\n",
        env!("CARGO_PKG_VERSION"),
        config.id
    );
    for (source, check) in agent.scheduler.checks() {
        let probed = check
            .probe_target
            .as_deref()
            .map(|t| format!("\ttarget={t}"))
            .unwrap_or_default();
        text.push_str(&format!(
            "  {:?}\tjob={}\tinstance={}{probed}\tmodule={}\tinterval={:?}\n",
            source, check.job, check.instance, check.module_name, check.interval
        ));
    }
    text.push_str("\nRecent probes (their debug output at /logs?id=N or /logs?target=T):\n");
    for probe in agent.scheduler.logs.list().iter().take(RECENT_ON_INDEX) {
        text.push_str(&crate::probe_logs::summary_line(probe));
        text.push('\n');
    }
    text.push_str("\nEndpoints: /metrics /probe /logs /-/healthy /-/ready\n");
    text
}

/// 200 "Ready." while [`AgentRuntime::readiness`] says so, else 503 with the reason.
async fn ready(State(agent): State<Arc<AgentRuntime>>) -> Response {
    match agent.readiness() {
        Ok(()) => "Ready.\n".into_response(),
        Err(reason) => (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("Not ready: {reason}\n"),
        )
            .into_response(),
    }
}

async fn metrics(State(agent): State<Arc<AgentRuntime>>, headers: HeaderMap) -> Response {
    let format = Format::negotiate(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    let mut families = agent.families();
    let reload = &sonde_cli::reload::RELOAD;
    families.push(
        Family::gauge(
            "sonde_config_last_reload_successful",
            "Whether the last configuration reload attempt was successful.",
        )
        .with(Vec::new(), f64::from(u8::from(reload.successful()))),
    );
    families.push(
        Family::gauge(
            "sonde_config_last_reload_success_timestamp_seconds",
            "Timestamp of the last successful configuration reload (or of the start).",
        )
        .with(Vec::new(), reload.last_success_seconds()),
    );
    (
        [(header::CONTENT_TYPE, format.content_type())],
        render(&families, format),
    )
        .into_response()
}

/// blackbox_exporter subtracts this from the scrape timeout so the answer arrives in time.
const SCRAPE_TIMEOUT_OFFSET: Duration = Duration::from_millis(500);
/// What blackbox_exporter uses when the scraper sends no timeout header (then capped at
/// `probe_endpoint.max_timeout`).
const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(120);
/// The shortest probe `/probe` runs, whatever it is asked for.
const MIN_PROBE_TIMEOUT: Duration = Duration::from_millis(100);
/// The header Prometheus sends with its scrape timeout, in seconds.
const SCRAPE_TIMEOUT_HEADER: &str = "X-Prometheus-Scrape-Timeout-Seconds";

/// A `/probe` request being served, counted in `AgentRuntime::probes_in_flight` until
/// dropped.
struct ProbeSlot<'a>(&'a AtomicUsize);

impl<'a> ProbeSlot<'a> {
    /// A slot when fewer than `max` probes run, else `None`.
    fn take(in_flight: &'a AtomicUsize, max: usize) -> Option<Self> {
        in_flight
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |n| {
                (n < max).then_some(n + 1)
            })
            .ok()
            .map(|_| Self(in_flight))
    }
}

impl Drop for ProbeSlot<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

/// The query parameters `/probe` reads. A parameter given twice counts with its last
/// value.
#[derive(Default)]
struct ProbeParams<'a> {
    target: Option<Cow<'a, str>>,
    module: Option<Cow<'a, str>>,
    debug: Option<Cow<'a, str>>,
}

impl<'a> ProbeParams<'a> {
    fn parse(query: &'a str) -> Self {
        let mut params = Self::default();
        for (name, value) in url::form_urlencoded::parse(query.as_bytes()) {
            match &*name {
                "target" => params.target = Some(value),
                "module" => params.module = Some(value),
                "debug" => params.debug = Some(value),
                _ => {}
            }
        }
        params
    }
}

async fn probe_handler(State(web): State<WebState>, request: Request) -> Response {
    // The request's parts are read in place: extracting the query and the headers would
    // copy them.
    let (request, _) = request.into_parts();
    let headers = &request.headers;
    let agent = &web.agent;
    let params = ProbeParams::parse(request.uri.query().unwrap_or(""));
    let config = agent.config();
    let settings = &config.probe_endpoint;
    if !settings.enabled {
        return (
            StatusCode::NOT_FOUND,
            "/probe is disabled; set probe_endpoint.enabled: true (with allowed_targets) in the agent config\n",
        )
            .into_response();
    }
    let module_name = params.module.as_deref().unwrap_or("http_2xx");
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
    let Some(target) = params.target.as_deref().filter(|t| !t.is_empty()) else {
        return (StatusCode::BAD_REQUEST, "Target parameter is missing\n").into_response();
    };
    let allowlists = web.allowlists.get(&config);
    let allowlist = match &*allowlists {
        Ok(a) => a,
        Err(e) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                format!("probe_endpoint.allowed_targets: {e}\n"),
            )
                .into_response();
        }
    };
    if let Err(reason) = allowlist.allows_target(module, target) {
        return (
            StatusCode::FORBIDDEN,
            format!("target {target:?} refused: {reason}\n"),
        )
            .into_response();
    }
    let Some(_slot) = ProbeSlot::take(&agent.probes_in_flight, settings.max_concurrent_probes)
    else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            format!(
                "too many probes running: /probe runs at most {} at once (probe_endpoint.max_concurrent_probes); try again later\n",
                settings.max_concurrent_probes
            ),
        )
            .into_response();
    };
    let timeout = probe_timeout(
        headers.get(SCRAPE_TIMEOUT_HEADER),
        module,
        settings.max_timeout.0,
    );
    let debug = params.debug.as_deref() == Some("true");
    let started_at = std::time::SystemTime::now();
    let outcome = probe::run_logged(
        &agent.probe_context,
        Some(allowlist),
        target,
        module,
        timeout,
        if debug {
            probe::ProbeLog::on()
        } else {
            probe::ProbeLog::default()
        },
    )
    .await;
    if outcome.failure_reason == Some(probe::Reason::RefusedByPolicy) {
        // A redirect or a DNS answer led the probe to an address the allowlist refuses;
        // nothing was sent there.
        return (
            StatusCode::FORBIDDEN,
            format!(
                "target {target:?} refused: {}\n",
                outcome.failure.as_deref().unwrap_or("refused")
            ),
        )
            .into_response();
    }
    let logs = &agent.scheduler.logs;
    if debug {
        let text = crate::probe_logs::debug_output(
            &outcome.log,
            module_name,
            target,
            &outcome.samples,
            module,
        );
        logs.keep_rendered(
            target,
            module_name,
            Origin::ProbeEndpoint,
            started_at,
            outcome.success,
            text.clone(),
        );
        return ([(header::CONTENT_TYPE, "text/plain; charset=utf-8")], text).into_response();
    }
    logs.keep_outcome(
        target,
        module_name,
        &Arc::new(module.clone()),
        Origin::ProbeEndpoint,
        started_at,
        &outcome,
    );
    let body = exposition(&outcome.samples);
    (
        [(header::CONTENT_TYPE, Format::PrometheusText.content_type())],
        body,
    )
        .into_response()
}

/// Probes listed on the index page.
const RECENT_ON_INDEX: usize = 50;

/// blackbox_exporter's `/logs`: the debug output of a kept probe, by `id`, or the
/// newest of `target` (of `module`, when given).
async fn logs_handler(State(agent): State<Arc<AgentRuntime>>, request: Request) -> Response {
    let mut id = None;
    let mut target = None;
    let mut module = None;
    for (name, value) in url::form_urlencoded::parse(request.uri().query().unwrap_or("").as_bytes())
    {
        match &*name {
            "id" => id = Some(value.into_owned()),
            "target" => target = Some(value.into_owned()),
            "module" => module = Some(value.into_owned()),
            _ => {}
        }
    }
    let logs = &agent.scheduler.logs;
    let found = match (id, target) {
        (Some(id), _) => match id.parse::<u64>() {
            Ok(id) => logs.by_id(id).ok_or_else(|| {
                (
                    StatusCode::NOT_FOUND,
                    format!("Probe id {id} not found: it was never run or has been dropped (the agent keeps the last {} probes per target); see / for the ids kept\n", crate::probe_logs::PER_TARGET),
                )
            }),
            Err(_) => Err((
                StatusCode::BAD_REQUEST,
                format!("Invalid probe id {id:?}: expected a number from the list at /\n"),
            )),
        },
        (None, Some(target)) => logs.latest(&target, module.as_deref()).ok_or_else(|| {
            (
                StatusCode::NOT_FOUND,
                format!(
                    "Probe target {target:?}{} not found: no probe of it has run since the agent started, or its logs were dropped; see / for what is kept\n",
                    module.as_deref().map(|m| format!(" with module {m:?}")).unwrap_or_default()
                ),
            )
        }),
        (None, None) => Err((
            StatusCode::BAD_REQUEST,
            "Give a probe id (/logs?id=N) or a target (/logs?target=T, optionally &module=M)\n"
                .to_string(),
        )),
    };
    match found {
        Ok(probe) => (
            [(header::CONTENT_TYPE, "text/plain; charset=utf-8")],
            probe.debug_output(),
        )
            .into_response(),
        Err(answer) => answer.into_response(),
    }
}

/// The samples of a probe in the Prometheus text format, as blackbox_exporter's registry
/// writes them: one family per metric name, in the order the names first appear, each a
/// gauge with blackbox_exporter's HELP text.
pub(crate) fn exposition(samples: &[probe::Sample]) -> String {
    // A family's HELP and TYPE lines and a sample take some 150 bytes.
    let mut out = String::with_capacity(160 * samples.len());
    for (i, first) in samples.iter().enumerate() {
        if samples[..i].iter().any(|s| s.name == first.name) {
            continue;
        }
        write_header(
            &mut out,
            first.name,
            help(first.name),
            MetricType::Gauge,
            Format::PrometheusText,
        );
        for sample in samples[i..].iter().filter(|s| s.name == first.name) {
            write_sample(
                &mut out,
                sample.name,
                sample.labels.iter().map(|(k, v)| (*k, v.as_str())),
                sample.value,
            );
        }
    }
    out
}

/// HELP texts for the probe metrics, worded as blackbox_exporter words them.
fn help(name: &str) -> &'static str {
    sonde_proto::help::series_help(name).unwrap_or("Probe metric")
}

/// How long a `/probe` may take: the scraper's timeout (`header`, in seconds) less
/// [`SCRAPE_TIMEOUT_OFFSET`], or [`DEFAULT_PROBE_TIMEOUT`] without a usable header; no
/// longer than the module's own timeout (when set) and `max`, no shorter than
/// [`MIN_PROBE_TIMEOUT`].
///
/// The header is the caller's: a value that is not UTF-8, not a number, not finite,
/// not positive or beyond any `Duration` counts as absent or as `max`, never as a panic.
fn probe_timeout(header: Option<&HeaderValue>, module: &Module, max: Duration) -> Duration {
    let scrape = header
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s > 0.0)
        .map(|s| {
            Duration::try_from_secs_f64(s)
                .unwrap_or(Duration::MAX)
                .saturating_sub(SCRAPE_TIMEOUT_OFFSET)
        });
    let mut timeout = scrape.unwrap_or(DEFAULT_PROBE_TIMEOUT).min(max);
    if !module.timeout.0.is_zero() {
        timeout = timeout.min(module.timeout.0);
    }
    timeout.max(MIN_PROBE_TIMEOUT)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn module(prober: &str) -> Module {
        serde_json::from_str(&format!(r#"{{"prober":"{prober}"}}"#)).unwrap()
    }

    fn timeout_for(header: Option<HeaderValue>, module: &Module) -> Duration {
        probe_timeout(header.as_ref(), module, Duration::from_secs(60))
    }

    #[test]
    fn the_scrape_timeout_header_never_panics_and_is_capped() {
        let m = module("http");
        let h = |v: &str| Some(HeaderValue::from_str(v).unwrap());
        // The ordinary case: the scrape timeout less the offset.
        assert_eq!(timeout_for(h("10"), &m), Duration::from_millis(9500));
        assert_eq!(timeout_for(h(" 2.5 "), &m), Duration::from_secs(2));
        // Absent: blackbox's 120 s, capped at max_timeout.
        assert_eq!(timeout_for(None, &m), Duration::from_secs(60));
        // Capped.
        assert_eq!(timeout_for(h("3600"), &m), Duration::from_secs(60));
        for hostile in [
            "NaN",
            "nan",
            "inf",
            "-inf",
            "Infinity",
            "-1",
            "-0",
            "0",
            "1e309",
            "1e300",
            "18446744073709551616",
            "1e-400",
            "",
            "ten",
            "0x10",
            "5s",
        ] {
            let t = timeout_for(h(hostile), &m);
            assert!(
                t >= MIN_PROBE_TIMEOUT && t <= Duration::from_secs(60),
                "{hostile:?}: {t:?}"
            );
        }
        // Not UTF-8.
        let bytes = HeaderValue::from_bytes(b"\xff\xfe10").unwrap();
        assert_eq!(timeout_for(Some(bytes), &m), Duration::from_secs(60));
        // Smaller than the offset: the floor.
        assert_eq!(timeout_for(h("0.2"), &m), MIN_PROBE_TIMEOUT);
        // The module's own timeout wins when shorter.
        let mut short = module("http");
        short.timeout = sonde_proto::config::PromDuration::from_secs(3);
        assert_eq!(timeout_for(h("10"), &short), Duration::from_secs(3));
        // A max_timeout at the extreme of Duration does not overflow either.
        assert_eq!(
            probe_timeout(h("1e300").as_ref(), &m, Duration::MAX),
            Duration::MAX - SCRAPE_TIMEOUT_OFFSET
        );
    }

    #[test]
    fn the_exposition_groups_samples_by_name_in_first_seen_order() {
        let sample = |name, labels: &[(&'static str, &str)], value| probe::Sample {
            name,
            labels: labels.iter().map(|(k, v)| (*k, v.to_string())).collect(),
            value,
        };
        let samples = vec![
            sample("probe_http_duration_seconds", &[("phase", "resolve")], 0.5),
            sample("probe_success", &[], 1.0),
            sample(
                "probe_http_duration_seconds",
                &[("phase", "con\"nect")],
                1e-7,
            ),
            sample("probe_expect_info", &[("a", "x"), ("b", "y\nz")], 1.0),
            sample("probe_duration_seconds", &[], f64::NAN),
        ];
        // The same text as building the families and rendering them.
        let mut families: Vec<Family> = Vec::new();
        for s in &samples {
            let labels: Vec<(String, String)> = s
                .labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect();
            match families.iter_mut().find(|f| f.name == s.name) {
                Some(f) => f.samples.push((labels, s.value)),
                None => families.push(Family::gauge(s.name, help(s.name)).with(labels, s.value)),
            }
        }
        let text = exposition(&samples);
        assert_eq!(text, render(&families, Format::PrometheusText));
        assert_eq!(
            text,
            "# HELP probe_http_duration_seconds Duration of http request by phase, summed over all redirects\n\
             # TYPE probe_http_duration_seconds gauge\n\
             probe_http_duration_seconds{phase=\"resolve\"} 0.5\n\
             probe_http_duration_seconds{phase=\"con\\\"nect\"} 0.0000001\n\
             # HELP probe_success Displays whether or not the probe was a success\n\
             # TYPE probe_success gauge\n\
             probe_success 1\n\
             # HELP probe_expect_info Explicit content matched\n\
             # TYPE probe_expect_info gauge\n\
             probe_expect_info{a=\"x\",b=\"y\\nz\"} 1\n\
             # HELP probe_duration_seconds Returns how long the probe took to complete in seconds\n\
             # TYPE probe_duration_seconds gauge\n\
             probe_duration_seconds NaN\n"
        );
    }

    #[test]
    fn probe_parameters_are_decoded_and_the_last_one_counts() {
        let p = ProbeParams::parse(
            "target=http%3A%2F%2Fa%3A80%2F%3Fx%3D1&module=m1&module=m2&debug=true&other=1",
        );
        assert_eq!(p.target.as_deref(), Some("http://a:80/?x=1"));
        assert_eq!(p.module.as_deref(), Some("m2"));
        assert_eq!(p.debug.as_deref(), Some("true"));
        let p = ProbeParams::parse("target=a+b%20c&debug");
        assert_eq!(p.target.as_deref(), Some("a b c"));
        assert_eq!(p.module, None);
        assert_eq!(p.debug.as_deref(), Some(""));
        assert!(ProbeParams::parse("").target.is_none());
        // Bytes that are not UTF-8 do not fail the request: they decode lossily.
        assert_eq!(
            ProbeParams::parse("target=%ff").target.as_deref(),
            Some("\u{fffd}")
        );
    }

    #[test]
    fn the_allowlist_is_parsed_once_per_config() {
        let cache = AllowlistCache::default();
        let mut config = crate::config::AgentConfig::minimal("a".into());
        config.probe_endpoint.allowed_targets = vec!["*.internal:443".into()];
        let first = Arc::new(config.clone());
        let a = cache.get(&first);
        assert!(Arc::ptr_eq(&a, &cache.get(&first)));
        config.probe_endpoint.allowed_targets = vec!["[::1:80".into()];
        let second = Arc::new(config);
        let b = cache.get(&second);
        assert!(!Arc::ptr_eq(&a, &b));
        assert!(b.as_ref().as_ref().is_err());
    }

    #[test]
    fn probe_slots_are_bounded_and_released() {
        let in_flight = AtomicUsize::new(0);
        let a = ProbeSlot::take(&in_flight, 2).unwrap();
        let b = ProbeSlot::take(&in_flight, 2).unwrap();
        assert!(ProbeSlot::take(&in_flight, 2).is_none());
        drop(a);
        let c = ProbeSlot::take(&in_flight, 2).unwrap();
        drop((b, c));
        assert_eq!(in_flight.load(Ordering::Relaxed), 0);
    }
}
