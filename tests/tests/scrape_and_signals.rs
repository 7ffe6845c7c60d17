//! Prometheus scraping the aggregator's `/metrics` (`honor_labels: true`) instead of
//! receiving remote write: the shipped alert rules still fire. And how long each signal
//! takes with the default settings (`global.scrape_interval` 15s, `scrape_timeout` 10s,
//! `fleet.missing_after` 2m), measured on the aggregator: a target that fails, an agent
//! killed, a job whose only agent is gone. The README quotes these figures.

use sonde_tests::{
    Scene, http_get, nginx_flip_file, prometheus_alerts, repo_path, start_agent, start_aggregator,
    start_nginx, start_prometheus_with,
};
use std::time::{Duration, Instant};

fn targets_state(web: &str, job: &str) -> Result<String, String> {
    let (_, body) = http_get(&format!("{web}/api/v1/targets"))?;
    let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    v["data"]
        .as_array()
        .and_then(|a| a.iter().find(|t| t["job"] == job))
        .and_then(|t| t["state"].as_str().map(str::to_string))
        .ok_or_else(|| format!("no target of job {job}"))
}

fn agent_up(web: &str, agent: &str) -> Result<bool, String> {
    let (_, body) = http_get(&format!("{web}/api/v1/agents"))?;
    let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    v["data"]
        .as_array()
        .and_then(|a| a.iter().find(|t| t["agent"] == agent))
        .and_then(|t| t["up"].as_bool())
        .ok_or_else(|| format!("no agent {agent}"))
}

fn job_missing(web: &str, job: &str) -> Result<bool, String> {
    let (_, body) = http_get(&format!("{web}/api/v1/jobs"))?;
    let v: serde_json::Value = serde_json::from_str(&body).map_err(|e| e.to_string())?;
    v["data"]
        .as_array()
        .and_then(|a| a.iter().find(|t| t["job"] == job))
        .and_then(|t| t["missing"].as_bool())
        .ok_or_else(|| format!("no job {job}"))
}

/// Alerts firing in Prometheus, as (alertname, job, agent).
fn firing(prom: &str) -> Result<Vec<(String, String, String)>, String> {
    Ok(prometheus_alerts(prom)?
        .iter()
        .filter(|a| a["state"] == "firing")
        .map(|a| {
            let l = &a["labels"];
            let s = |k: &str| l[k].as_str().unwrap_or("").to_string();
            (s("alertname"), s("job"), s("agent"))
        })
        .collect())
}

#[test]
fn scraped_metrics_fire_the_alerts_and_each_signal_takes_what_the_readme_says() {
    let mut scene = Scene::new("scrape-and-signals");
    let nginx = start_nginx(&mut scene, "nginx");
    let target = format!("http://127.0.0.1:{nginx}/flip");
    // Defaults everywhere: no global section, no fleet section.
    let aggregator = start_aggregator(
        &mut scene,
        "aggregator",
        &format!(
            r#"modules:
  http_2xx: {{prober: http, http: {{preferred_ip_protocol: ip4}}}}
jobs:
  - job_name: shop
    module: http_2xx
    static_configs: [{{targets: ["{target}"]}}]
  - job_name: lonely
    module: http_2xx
    agents: {{site: lonely}}
    static_configs: [{{targets: ["http://127.0.0.1:{nginx}/"]}}]
"#
        ),
    );
    let started = Instant::now();
    let web = aggregator.web.clone();
    let agent = |id: &str, site: &str| {
        format!(
            "agent:\n  id: {id}\n  labels: {{site: {site}}}\naggregators:\n  - address: {}\n",
            aggregator.grpc
        )
    };
    start_agent(&mut scene, "edge-a", &agent("edge-a", "main"));
    start_agent(&mut scene, "edge-lonely", &agent("edge-lonely", "lonely"));
    let web_addr = web.trim_start_matches("http://").to_string();
    let prom = start_prometheus_with(
        &mut scene,
        "prometheus",
        &[repo_path("deploy/prometheus/sonde-alerts.yml")],
        &format!(
            "scrape_configs:\n  - job_name: sonde-aggregator\n    honor_labels: true\n    scrape_interval: 2s\n    static_configs: [{{targets: [\"{web_addr}\"]}}]\n"
        ),
    );
    let wait = Duration::from_secs(180);
    for job in ["shop", "lonely"] {
        scene.wait_until(&format!("{job} up"), wait, || {
            match targets_state(&web, job)? {
                s if s == "up" => Ok(()),
                s => Err(s),
            }
        });
    }
    // Scraped with honor_labels, the merged series keep their own job and instance.
    scene.wait_until("up{job=\"shop\"} in Prometheus", wait, || {
        let v = sonde_tests::prometheus_single(
            &prom,
            &format!("up{{job=\"shop\",instance=\"{target}\"}}"),
        )?;
        (v == 1.0).then_some(()).ok_or(format!("{v}"))
    });

    // 1. A target that starts failing.
    let flip = nginx_flip_file(&scene, "nginx");
    std::fs::write(&flip, "down").expect("flip down");
    let t0 = Instant::now();
    scene.wait_until("shop down", wait, || match targets_state(&web, "shop")? {
        s if s == "down" => Ok(()),
        s => Err(s),
    });
    let target_down = t0.elapsed();
    scene.wait_until("an alert for the down target", wait, || {
        let f = firing(&prom)?;
        f.iter()
            .any(|(_, job, _)| job == "shop")
            .then_some(())
            .ok_or(format!("{f:?}"))
    });
    std::fs::remove_file(&flip).expect("flip up");

    // 2. An agent killed, and 3. the job only it probed.
    scene.kill("edge-lonely");
    let t0 = Instant::now();
    let mut job_gone = None;
    let agent_gone = scene.wait_until("edge-lonely down", wait, || {
        if job_gone.is_none() && job_missing(&web, "lonely")? {
            job_gone = Some(t0.elapsed());
        }
        match agent_up(&web, "edge-lonely")? {
            false => Ok(t0.elapsed()),
            true => Err("still up".into()),
        }
    });
    let job_gone = match job_gone {
        Some(d) => d,
        None => scene.wait_until("lonely missing", wait, || {
            job_missing(&web, "lonely")?
                .then(|| t0.elapsed())
                .ok_or("not yet".to_string())
        }),
    };
    scene.wait_until(
        "the alerts for the missing job and the gone agent",
        wait,
        || {
            let f = firing(&prom)?;
            let job = f.iter().any(|(_, job, _)| job == "lonely");
            let agent = f.iter().any(|(_, _, agent)| agent == "edge-lonely");
            (job && agent).then_some(()).ok_or(format!("{f:?}"))
        },
    );
    println!(
        "signals with the defaults: target down after {:.1}s, job missing after {:.1}s, agent down after {:.1}s",
        target_down.as_secs_f64(),
        job_gone.as_secs_f64(),
        agent_gone.as_secs_f64()
    );
    // What the README says: within one interval (15s) for a target; 2 × interval +
    // timeout (40s) after the last result for a job, but not within missing_after (2m)
    // of the aggregator's start; missing_after (2m) for an agent.
    assert!(target_down <= Duration::from_secs(17), "{target_down:?}");
    let killed_at = t0.duration_since(started);
    let grace_left = Duration::from_secs(120).saturating_sub(killed_at);
    // (`started` is taken once the aggregator answers, a moment after its grace began.)
    let low = Duration::from_secs(25).max(grace_left.saturating_sub(Duration::from_secs(3)));
    let high = Duration::from_secs(57).max(grace_left + Duration::from_secs(2));
    assert!(
        job_gone >= low && job_gone <= high,
        "{job_gone:?}, killed {killed_at:?} after the start"
    );
    assert!(
        agent_gone >= Duration::from_secs(119) && agent_gone <= Duration::from_secs(123),
        "{agent_gone:?}"
    );
    scene.check_running().expect("the rest still running");
}
