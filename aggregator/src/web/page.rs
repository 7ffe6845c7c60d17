//! What every HTML page shares: the styles (light, and dark from the browser's
//! preference), the heading, the navigation, and what a published page leaves out
//! (`status_page.public`: the config path, the API links, the agents).

use super::svg::esc;
use super::view::Summary;
use crate::app::App;
use crate::history::HistoryState;
use sonde_proto::config::Labels;
use std::fmt::Write;

/// How a page presents itself, from the config's `status_page:`.
#[derive(Clone, Debug)]
pub struct Chrome {
    /// A page people publish: no config path, no API links, no agent details.
    pub public: bool,
    /// The heading of every page.
    pub title: String,
    /// What the config is (its path, or the built-in one); never shown when public.
    pub config: String,
}

impl Chrome {
    pub fn of(app: &App) -> Self {
        let config = app.hub.config();
        Self {
            public: config.status_page.public,
            title: config
                .status_page
                .title
                .clone()
                .filter(|t| !t.trim().is_empty())
                .unwrap_or_else(|| "sonde aggregator".into()),
            config: app
                .config_file
                .as_ref()
                .map_or("built-in all-in-one".to_string(), |p| {
                    p.display().to_string()
                }),
        }
    }
}

/// The styles: colours are variables, switched by `prefers-color-scheme`, and the SVG
/// pictures use classes, so that they follow too.
const STYLE: &str = r#"
:root{--fg:#1f2328;--bg:#fff;--muted:#6a737d;--line:#d8dee4;--head:#f4f6f8;--link:#1a5fb4;
--up-bg:#d4f5dc;--up-fg:#135c25;--down-bg:#fbd5d5;--down-fg:#8a1111;--deg-bg:#fdf0c4;--deg-fg:#7a5800;
--miss-bg:#e8e8e8;--miss-fg:#555;--plot:#fafafa;--grid:#e3e3e3;--unknown:#c8c8c8;
--c-up:#2e9e4f;--c-degraded:#e0a100;--c-down:#d13b3b;--c-missing:#9a9a9a}
@media (prefers-color-scheme:dark){:root{--fg:#e6edf3;--bg:#0d1117;--muted:#8b949e;--line:#30363d;--head:#161b22;--link:#6cb6ff;
--up-bg:#12361f;--up-fg:#7ee2a0;--down-bg:#4a1515;--down-fg:#ffa8a8;--deg-bg:#3d2f00;--deg-fg:#f5d06b;
--miss-bg:#2d333b;--miss-fg:#adbac7;--plot:#161b22;--grid:#30363d;--unknown:#484f58;
--c-up:#3fb950;--c-degraded:#d29922;--c-down:#f85149;--c-missing:#6e7681}}
*{box-sizing:border-box}
html{color-scheme:light dark}
body{font-family:system-ui,sans-serif;margin:0 auto;padding:1rem;max-width:80rem;color:var(--fg);background:var(--bg);line-height:1.4}
h1{margin:0 0 .2rem;font-size:1.5rem} h2{margin-top:1.6rem;font-size:1.2rem}
a{color:var(--link)} code{font-size:.85rem;overflow-wrap:anywhere}
.scroll{overflow-x:auto;max-width:100%}
table{border-collapse:collapse;width:100%;font-size:.9rem}
th,td{text-align:left;padding:.3rem .5rem;border-bottom:1px solid var(--line);vertical-align:top;overflow-wrap:break-word}
th{background:var(--head)}
.badge{padding:.1rem .4rem;border-radius:.3rem;font-weight:600;font-size:.8rem;white-space:nowrap}
.up{background:var(--up-bg);color:var(--up-fg)} .down{background:var(--down-bg);color:var(--down-fg)}
.missing{background:var(--miss-bg);color:var(--miss-fg)} .degraded{background:var(--deg-bg);color:var(--deg-fg)}
.muted{color:var(--muted)} nav{color:var(--muted);font-size:.9rem} nav a{margin-right:.6rem}
.summary{border-radius:.5rem;padding:.8rem 1rem;margin:.8rem 0;display:flex;flex-wrap:wrap;gap:.4rem 1.4rem;align-items:baseline}
.summary .headline{font-size:1.3rem;font-weight:700;flex:1 1 100%}
.summary .count{font-size:1rem} .summary .count b{font-size:1.2rem}
.grid{display:flex;flex-wrap:wrap;gap:.6rem} .tile{border:1px solid var(--line);border-radius:.4rem;padding:.4rem .6rem;min-width:9rem}
.uptimes td{font-size:1.1rem;font-weight:600}
.side{display:flex;flex-wrap:wrap;gap:.8rem} .side>div{flex:1 1 16rem;min-width:0;overflow-x:auto;overflow-wrap:anywhere;border:1px solid var(--line);border-radius:.4rem;padding:.5rem}
.trace{font-family:monospace;font-size:.8rem;margin:.4rem 0;padding-left:1.4rem;overflow-wrap:anywhere} .path{font-family:monospace;font-size:.8rem;width:auto}
svg.chart{width:100%;height:auto;display:block}
svg.timeline{width:100%;height:1.4rem;display:block}
svg.heartbeat{width:100%;min-width:7rem;height:1.1rem;display:block}
.plot{fill:var(--plot);stroke:var(--line)} .axis{fill:var(--muted);font-size:10px} .gridline{stroke:var(--grid)}
.bg{fill:var(--miss-bg)}
.seg-up,.hb-up{fill:var(--c-up)} .seg-degraded,.hb-degraded{fill:var(--c-degraded)} .seg-down,.hb-down{fill:var(--c-down)} .seg-missing,.hb-missing{fill:var(--c-missing)}
.hb-unknown{fill:none;stroke:var(--unknown);stroke-dasharray:2 2}
form.search{display:flex;flex-wrap:wrap;gap:.4rem;margin:.6rem 0} form.search input[type=search]{flex:1 1 12rem;min-width:0}
input,select,button{font:inherit;color:inherit;background:var(--bg);border:1px solid var(--line);border-radius:.3rem;padding:.2rem .4rem}
.pages{margin:.6rem 0} .pages a,.pages span{margin-right:.8rem}
@media (max-width:40rem){body{padding:.6rem} .wide{display:none} th,td{padding:.25rem .3rem}}
"#;

/// The top of a page: styles, a self-refresh every `refresh` seconds if given (the
/// main page and the target lists update themselves through [`LIVE_SCRIPT`] instead),
/// the heading and the navigation.
pub fn head(chrome: &Chrome, title: &str, refresh: Option<u32>) -> String {
    let mut h = format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="color-scheme" content="light dark">{refresh}<title>{title}</title>
<style>{STYLE}</style></head><body>
<h1>{title}</h1><nav><a href="/">status</a> <a href="/targets">targets</a> "#,
        refresh = refresh
            .map(|s| format!(r#"<meta http-equiv="refresh" content="{s}">"#))
            .unwrap_or_default(),
        title = esc(title),
    );
    if chrome.public {
        h.push_str("</nav>\n");
    } else {
        let _ = writeln!(
            h,
            r#"<a href="/fleet">fleet</a> <a href="/metrics">/metrics</a> <a href="/api/v1/targets">/api/v1/targets</a> <a href="/api/v1/jobs">/api/v1/jobs</a> <a href="/api/v1/agents">/api/v1/agents</a><br>sonde {version} · config <code>{config}</code></nav>"#,
            version = env!("CARGO_PKG_VERSION"),
            config = esc(&chrome.config),
        );
    }
    h
}

/// A few lines that keep the counts and the target rows of a page current: every few
/// seconds they ask `/api/v1/status?since=<version>` what changed since the version the
/// page (or the last answer) shows, and rewrite what changed. The page reads the same
/// without them, as it was when served.
pub const LIVE_SCRIPT: &str = r#"<script>
(function(){var b=document.getElementById('live'),v=b&&b.getAttribute('data-version');if(!v||!window.fetch)return;
function key(j,i){return j+'\n'+i}
function badge(c,s){var e=document.createElement('span');e.className='badge '+c;e.textContent=s.toUpperCase();return e}
function tick(){fetch('/api/v1/status?since='+v,{cache:'no-store'}).then(function(r){return r.json()}).then(function(d){d=d.data;v=d.version;
var s=d.summary;document.querySelectorAll('[data-count]').forEach(function(e){var n=s[e.getAttribute('data-count')];if(n!==undefined)e.textContent=n});
var o=document.getElementById('overall');if(o){o.className='summary '+(s.overall=='up'?'up':s.overall);o.setAttribute('data-overall',s.overall);var h=o.querySelector('.headline');if(h)h.textContent=d.headline}
var rows={};document.querySelectorAll('tr[data-instance]').forEach(function(r){rows[key(r.getAttribute('data-job'),r.getAttribute('data-instance'))]=r});
d.targets.forEach(function(t){var r=rows[key(t.job,t.instance)];if(!r)return;r.setAttribute('data-state',t.state);var c=r.querySelector('.state');if(c){c.textContent='';c.appendChild(badge(t.state,t.state))}});
d.jobs.forEach(function(j){document.querySelectorAll('tr[data-job-row]').forEach(function(r){if(r.getAttribute('data-job-row')!=j.job)return;var c=r.querySelector('.state');if(c){c.textContent='';c.appendChild(badge({ok:'up',down:'down',missing:'down',degraded:'degraded'}[j.status]||'missing',j.status))}var w=r.querySelector('.why');if(w)w.textContent=j.why})});
if(d.truncated){var n=document.getElementById('stale');if(n)n.hidden=false}
}).catch(function(){}).then(function(){setTimeout(tick,5000)})}
setTimeout(tick,5000)})();
</script>"#;

/// `name="value", …`, as PromQL writes a selector.
pub fn labels(labels: &Labels) -> String {
    labels
        .iter()
        .map(|(k, v)| format!("{k}=\"{v}\""))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A state as a coloured word.
pub fn state_badge(state: HistoryState) -> String {
    let s = state.as_str();
    format!("<span class=\"badge {s}\">{}</span>", s.to_uppercase())
}

/// The badge beside an agent's state while maintenance window `window` keeps its
/// results out of `up` (agents' table on `/`, `/fleet`).
pub fn agent_maintenance_badge(window: &str) -> String {
    format!(
        r#" <span class="badge missing" title="its results do not count toward up">IN MAINTENANCE</span> <span class="muted">{}</span>"#,
        esc(window)
    )
}

/// The per-target page of `job`/`instance`.
pub fn target_link(job: &str, instance: &str) -> String {
    format!(
        "/target?job={}&instance={}",
        url::form_urlencoded::byte_serialize(job.as_bytes()).collect::<String>(),
        url::form_urlencoded::byte_serialize(instance.as_bytes()).collect::<String>()
    )
}

/// The summary header, with the counts the live script updates.
pub fn summary_header(summary: &Summary) -> String {
    let class = summary.overall;
    let count = |name: &str, n: usize, what: &str| {
        format!(r#"<span class="count"><b data-count="{name}">{n}</b> {what}</span>"#)
    };
    format!(
        r#"<section id="overall" class="summary {class}" data-overall="{overall}"><div class="headline">{headline}</div>{}{}{}{}{}<span class="count muted">targets <b data-count="targets">{targets}</b> · jobs <span data-count="jobs">{jobs}</span></span></section>"#,
        count("up", summary.up, "up"),
        count("degraded", summary.degraded, "degraded"),
        count("down", summary.down, "down"),
        count("missing", summary.missing, "missing"),
        count("jobs_missing", summary.jobs_missing, "jobs missing"),
        overall = summary.overall,
        headline = summary.headline(),
        targets = summary.targets,
        jobs = summary.jobs,
    )
}
