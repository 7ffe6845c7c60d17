//! `/metrics`: the merged series (so Prometheus can scrape instead of receiving remote
//! write), the latest per-agent probe series, and the aggregator's self-metrics, in the
//! text format or OpenMetrics as the scraper asks.

use crate::app::App;
use crate::fleet::now_ms;
use crate::hub::Snapshot;
use axum::extract::State;
use axum::http::{HeaderMap, header};
use axum::response::{IntoResponse, Response};
use sonde_proto::exposition::{
    Family, Format, MetricType, finish, render_into, write_header, write_sample,
};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;

pub async fn handler(State(app): State<Arc<App>>, headers: HeaderMap) -> Response {
    let format = Format::negotiate(headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()));
    let snapshot = app.hub.snapshot().await;
    let chunks = render(&app, &snapshot, format).into_chunks();
    let body = axum::body::Body::from_stream(futures::stream::iter(
        chunks.into_iter().map(Ok::<_, std::convert::Infallible>),
    ));
    ([(header::CONTENT_TYPE, format.content_type())], body).into_response()
}

/// Text written in chunks of about 1 MiB, so that a large page is never copied into an
/// ever-doubling buffer.
#[derive(Default)]
pub struct Chunked {
    done: Vec<String>,
    current: String,
}

impl Chunked {
    const CHUNK: usize = 1 << 20;

    /// The buffer to write the next line into.
    fn buffer(&mut self) -> &mut String {
        if self.current.len() >= Self::CHUNK {
            let next = String::with_capacity(Self::CHUNK + (64 << 10));
            self.done.push(std::mem::replace(&mut self.current, next));
        }
        &mut self.current
    }

    pub fn into_chunks(mut self) -> Vec<String> {
        self.done.push(self.current);
        self.done
    }
}

/// The whole `/metrics` page. The per-agent probe series, the bulk of it, are written
/// straight from the hub's state: no label set is copied to build them.
pub fn render(app: &App, snapshot: &Snapshot, format: Format) -> Chunked {
    let mut page = Chunked::default();
    let rest = families(app, snapshot, |external, merged| {
        render_into(page.buffer(), &merged, format);
        write_probe_series(&mut page, snapshot, external, format);
    });
    render_into(page.buffer(), &rest, format);
    finish(page.buffer(), format);
    page
}

/// Every agent's latest probe series, grouped by metric name as the formats require,
/// with the labels they are written with (see [`crate::labels`]).
fn write_probe_series(
    out: &mut Chunked,
    snapshot: &Snapshot,
    external: &[crate::series::Label],
    format: Format,
) {
    type Line<'a> = (&'a crate::series::SeriesLabels, f64);
    let mut by_name: BTreeMap<&str, Vec<Line<'_>>> = BTreeMap::new();
    for entry in snapshot.entries.values() {
        for view in entry.views.values() {
            for (series, value) in view.series.iter().zip(view.values.iter()) {
                by_name
                    .entry(series.name())
                    .or_default()
                    .push((series, *value));
            }
        }
    }
    for (name, lines) in by_name {
        write_header(
            out.buffer(),
            name,
            sonde_proto::help::series_help(name).unwrap_or("sonde series."),
            MetricType::Gauge,
            format,
        );
        for (series, value) in lines {
            let own = series
                .labels()
                .iter()
                .filter(|(k, _)| &**k != "__name__")
                .map(|(k, v)| (&**k, &**v));
            // External labels last, unless the series already has the name.
            let external = external
                .iter()
                .filter(|(k, _)| series.get(k).is_none())
                .map(|(k, v)| (&**k, &**v));
            write_sample(out.buffer(), name, own.chain(external), value);
        }
    }
}

fn labels_of(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs
        .iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect()
}

/// A gauge family with the HELP text every output of sonde uses for it.
fn series_gauge(name: &str) -> Family {
    Family::gauge(
        name,
        sonde_proto::help::series_help(name).unwrap_or("sonde series."),
    )
}

/// The families before and after the probe series, which `probe` writes meanwhile,
/// from the same snapshot of the hub's state.
fn families(
    app: &App,
    snapshot: &Snapshot,
    probe: impl FnOnce(&[crate::series::Label], Vec<Family>),
) -> Vec<Family> {
    let now = now_ms();
    let state = snapshot;
    let external = crate::labels::external(&state.config.external_labels);
    let with_external = |mut l: Vec<(String, String)>| {
        for (k, v) in &external {
            if !l.iter().any(|(x, _)| x == &**k) {
                l.push((k.to_string(), v.to_string()));
            }
        }
        l
    };
    let mut up = series_gauge("up");
    let mut agents = series_gauge("sonde_target_agents");
    let mut succeeding = series_gauge("sonde_target_agents_succeeding");
    for entry in state.entries.values() {
        if let Some(m) = entry.merged {
            let series = &entry.merged_series;
            if let Some(v) = m.state.up_value() {
                up.samples
                    .push((crate::labels::exposed(&series.up, &external), v));
            }
            agents.samples.push((
                crate::labels::exposed(&series.agents, &external),
                f64::from(m.agents),
            ));
            succeeding.samples.push((
                crate::labels::exposed(&series.succeeding, &external),
                f64::from(m.succeeding),
            ));
        }
    }
    // Only for the targets some window selects (see `sonde_hub::state::maintenance`).
    let mut in_maintenance = series_gauge("sonde_target_in_maintenance");
    if !state.maintenance.selects_nothing(now) {
        for entry in state.entries.values() {
            if entry.merged.is_some() && state.maintenance.could_match(&entry.base, now) {
                let active = state.maintenance.active(&entry.base, now).is_some();
                in_maintenance.samples.push((
                    crate::labels::exposed(
                        &entry.base.merged("sonde_target_in_maintenance"),
                        &external,
                    ),
                    f64::from(u8::from(active)),
                ));
            }
        }
    }
    probe(&external, vec![up, agents, succeeding, in_maintenance]);
    let mut job_missing = series_gauge("sonde_job_missing");
    let mut job_targets = series_gauge("sonde_job_targets");
    for (name, job) in &state.jobs {
        let n = state.job_target_count(name);
        job_missing.samples.push((
            with_external(labels_of(&[("job", name)])),
            f64::from(u8::from(job.missing)),
        ));
        job_targets
            .samples
            .push((with_external(labels_of(&[("job", name)])), n as f64));
    }
    let mut agent_up = series_gauge("sonde_agent_up");
    let mut last_seen = series_gauge("sonde_agent_last_seen_timestamp_seconds");
    let mut info = series_gauge("sonde_agent_info");
    let mut skew = series_gauge("sonde_agent_clock_skew_seconds");
    // Only for the agents some window selects, as for targets.
    let mut agent_maintenance = series_gauge("sonde_agent_in_maintenance");
    for (id, a) in &state.agents {
        if state.maintenance.could_match_agent(id, &a.labels, now) {
            agent_maintenance.samples.push((
                with_external(labels_of(&[("agent", id)])),
                f64::from(u8::from(a.in_maintenance)),
            ));
        }
        let l = with_external(labels_of(&[("agent", id)]));
        let up = a.is_up(now, state.config.missing_after);
        agent_up.samples.push((l.clone(), f64::from(u8::from(up))));
        last_seen
            .samples
            .push((l, a.last_seen_at(now) as f64 / 1000.0));
        info.samples.push((
            crate::labels::exposed(&crate::labels::agent_info(id, &a.labels), &external),
            1.0,
        ));
        if let Some(ms) = a.clock_skew_ms {
            skew.samples.push((
                with_external(labels_of(&[("agent", id)])),
                ms as f64 / 1000.0,
            ));
        }
    }

    let c = &app.hub.counters;
    let counter = |name: &str, help: &str, v: &std::sync::atomic::AtomicU64| {
        Family::counter(name, help).with(Vec::new(), v.load(Ordering::Relaxed) as f64)
    };
    let mut out = vec![
        job_missing,
        job_targets,
        agent_up,
        last_seen,
        info,
        skew,
        agent_maintenance,
    ];
    out.push(counter(
        "sonde_results_received_total",
        "Probe results received from agents (replays included).",
        &c.results_received,
    ));
    out.push(counter(
        "sonde_results_deduplicated_total",
        "Replayed results dropped because they were already committed.",
        &c.results_deduplicated,
    ));
    out.push(counter(
        "sonde_results_unexpected_total",
        "Results for targets this aggregator does not expect (removed jobs or targets).",
        &c.results_unexpected,
    ));
    let mut refused = Family::counter(
        "sonde_results_refused_total",
        "Results and samples refused from an agent, by reason (see the README's Security model).",
    );
    for (agent, reason, n) in app.hub.refusals.counts() {
        refused.samples.push((
            labels_of(&[("agent", &agent), ("reason", reason)]),
            n as f64,
        ));
    }
    out.push(refused);
    out.push(
        Family::counter(
            "sonde_storage_errors_total",
            "Commits the store refused (a full disk, I/O errors); acks wait until one succeeds.",
        )
        .with(Vec::new(), app.hub.storage.errors() as f64),
    );
    out.push(counter(
        "sonde_store_commits_total",
        "Transactions committed by the storage thread; each takes every batch, tick and reload applied since the one before (group commit).",
        &c.commits,
    ));
    out.push(counter(
        "sonde_store_committed_requests_total",
        "Batches, ticks and reloads answered after a commit; divided by sonde_store_commits_total, how many share a commit.",
        &c.committed_commands,
    ));
    let reload = app
        .reload_status
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    out.push(
        Family::gauge(
            "sonde_config_last_reload_successful",
            "Whether the last configuration reload attempt was successful.",
        )
        .with(Vec::new(), f64::from(u8::from(reload.successful))),
    );
    out.push(
        Family::gauge(
            "sonde_config_last_reload_success_timestamp_seconds",
            "Timestamp of the last successful configuration reload (or of the start).",
        )
        .with(Vec::new(), reload.last_success_ms as f64 / 1000.0),
    );
    let mut sd_failures = Family::counter(
        "sonde_sd_refresh_failures_total",
        "Failed refreshes of a discovery mechanism (http, dns, kubernetes); the targets found before are kept.",
    );
    for (mechanism, n) in app.hub.discovery_counters().refresh_failures() {
        sd_failures = sd_failures.with(vec![("mechanism".into(), mechanism.into())], n as f64);
    }
    out.push(sd_failures);
    out.push(counter(
        "sonde_agent_connects_total",
        "Agent streams opened.",
        &c.agent_connects,
    ));
    out.push(counter(
        "sonde_agents_refused_total",
        "Agent streams refused (authentication, protocol version).",
        &c.agents_refused,
    ));
    for family in app.outputs.writers().iter().flat_map(|w| w.families()) {
        // Every endpoint reports the same families; each family may appear only once.
        match out.iter_mut().find(|f| f.name == family.name) {
            Some(existing) => existing.samples.extend(family.samples),
            None => out.push(family),
        }
    }
    out
}
