//! What lives under `--storage.path`, with the real binaries: one process per directory
//! (a second one is refused, naming the path and the PID that holds it, and a SIGKILLed
//! holder leaves no stale lock); a damaged block of the remote-write queue counted as
//! `damaged`; the aggregator's restarts recorded in each target's history as gaps, never
//! as state changes; and the history kept under `history.max_size` in bytes when its rows
//! are big.

use sonde_tests::{
    RestartableAggregator, Scene, accepting_tcp_port, free_port, http_get, metric_sum,
    nginx_flip_file, run, sonde_bin, start_agent, start_nginx,
};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

const WAIT: Duration = Duration::from_secs(60);

fn encode(s: &str) -> String {
    url::form_urlencoded::byte_serialize(s.as_bytes()).collect()
}

/// Runs the second process that must be refused: it exits non-zero at once, saying the
/// path, the holder's PID and what to do.
fn assert_refused(scene: &Scene, cmd: Command, storage: &Path, holder_pid: u32) {
    let out = run(cmd, scene.dir().path(), Duration::from_secs(30));
    let text = out.combined();
    assert!(
        !out.status.success(),
        "a second process on {} started:\n{text}",
        storage.display()
    );
    for want in [
        storage.display().to_string(),
        format!("PID {holder_pid}"),
        "--storage.path".to_string(),
    ] {
        assert!(text.contains(&want), "no {want:?} in the refusal:\n{text}");
    }
    assert!(
        !text.contains("resuming the remote write queue"),
        "the refused process opened the queue:\n{text}"
    );
}

fn aggregator_command(config: &Path, storage: &Path) -> Command {
    let mut cmd = Command::new(sonde_bin("sonde-aggregator"));
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!("--web.listen-address=127.0.0.1:{}", free_port()))
        .arg(format!("--grpc.listen-address=127.0.0.1:{}", free_port()))
        .arg(format!("--storage.path={}", storage.display()));
    cmd
}

#[test]
fn a_second_aggregator_on_the_same_storage_is_refused_and_a_killed_one_leaves_no_lock() {
    let mut scene = Scene::new("storage-lock-aggregator");
    let receiver = free_port();
    let agg = RestartableAggregator::new(
        &scene,
        "aggregator",
        &format!(
            "global: {{scrape_interval: 1s, scrape_timeout: 500ms}}\nmodules:\n  tcp: {{prober: tcp}}\njobs: []\nremote_write:\n  - url: http://127.0.0.1:{receiver}/api/v1/write\n"
        ),
    );
    agg.start(&mut scene, "aggregator-0", &[]);
    let first = scene.process("aggregator-0").pid();
    assert_refused(
        &scene,
        aggregator_command(&agg.config, &agg.data),
        &agg.data,
        first,
    );
    scene.check_running().expect("the first aggregator runs on");
    http_get(&format!("{}/-/ready", agg.web())).expect("the first aggregator still answers");

    // SIGKILL: the kernel drops the lock with the process.
    scene.kill("aggregator-0");
    agg.start(&mut scene, "aggregator-1", &[]);
    let second = scene.process("aggregator-1").pid();
    assert_refused(
        &scene,
        aggregator_command(&agg.config, &agg.data),
        &agg.data,
        second,
    );
}

#[test]
fn the_all_in_one_default_locks_its_storage_and_its_embedded_agents() {
    let mut scene = Scene::new("storage-lock-all-in-one");
    let storage = scene.dir().join("data");
    // No config file in its working directory and only the all-in-one's flags.
    let all_in_one = |scene: &Scene| {
        let mut cmd = Command::new(sonde_bin("sonde-aggregator"));
        cmd.current_dir(scene.dir().path())
            .arg(format!("--web.listen-address=127.0.0.1:{}", free_port()))
            .arg(format!("--grpc.listen-address=127.0.0.1:{}", free_port()))
            .arg(format!("--storage.path={}", storage.display()));
        cmd
    };
    let cmd = all_in_one(&scene);
    let web = cmd
        .get_args()
        .find_map(|a| {
            a.to_str()?
                .strip_prefix("--web.listen-address=")
                .map(String::from)
        })
        .expect("the web address");
    scene.spawn("all-in-one", cmd);
    let pid = scene.process("all-in-one").pid();
    // Its embedded agent reports: the status page lists the agent `all-in-one`.
    scene.wait_until("the embedded agent connected", WAIT, || {
        match http_get(&format!("http://{web}/api/v1/agents"))? {
            (200, body) if body.contains("\"all-in-one\"") => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    let embedded_lock = storage.join("embedded-agent").join("agent.lock");
    let text = std::fs::read_to_string(&embedded_lock)
        .unwrap_or_else(|e| panic!("{}: {e}", embedded_lock.display()));
    assert_eq!(text.lines().next(), Some(pid.to_string().as_str()));
    assert_refused(&scene, all_in_one(&scene), &storage, pid);
}

fn agent_command(config: &Path, storage: &Path) -> Command {
    let mut cmd = Command::new(sonde_bin("sonde-agent"));
    cmd.arg(format!("--config.file={}", config.display()))
        .arg(format!("--web.listen-address=127.0.0.1:{}", free_port()))
        .arg(format!("--storage.path={}", storage.display()));
    cmd
}

#[test]
fn a_second_agent_on_the_same_storage_is_refused_and_a_killed_one_leaves_no_lock() {
    let mut scene = Scene::new("storage-lock-agent");
    let config = format!(
        "agent: {{id: edge}}\naggregators: [{{address: \"http://127.0.0.1:{}\"}}]\n",
        free_port()
    );
    start_agent(&mut scene, "edge-0", &config);
    let config_file = scene.dir().join("edge-0.yml");
    let storage = scene.dir().join("edge-0-data");
    let first = scene.process("edge-0").pid();
    assert_refused(
        &scene,
        agent_command(&config_file, &storage),
        &storage,
        first,
    );
    scene.check_running().expect("the first agent runs on");

    scene.kill("edge-0");
    let cmd = agent_command(&config_file, &storage);
    let web = cmd
        .get_args()
        .find_map(|a| {
            a.to_str()?
                .strip_prefix("--web.listen-address=")
                .map(String::from)
        })
        .expect("the web address");
    scene.spawn("edge-1", cmd);
    scene.wait_until("the restarted agent healthy", WAIT, || {
        match http_get(&format!("http://{web}/-/healthy"))? {
            (200, _) => Ok(()),
            other => Err(format!("{other:?}")),
        }
    });
    let second = scene.process("edge-1").pid();
    assert_refused(
        &scene,
        agent_command(&config_file, &storage),
        &storage,
        second,
    );
}

fn dropped(web: &str, reason: &str) -> Result<f64, String> {
    metric_sum(
        web,
        "sonde_remote_write_samples_dropped_total",
        &[("reason", reason)],
    )
}

#[test]
fn a_damaged_queue_block_is_counted_as_damaged_not_as_invalid_labels() {
    let mut scene = Scene::new("storage-damaged-block");
    let target = accepting_tcp_port();
    // Nothing listens on the receiver's port: the queue only grows.
    let receiver = free_port();
    let agg = RestartableAggregator::new(
        &scene,
        "aggregator",
        &format!(
            r#"global: {{scrape_interval: 1s, scrape_timeout: 500ms}}
modules:
  tcp: {{prober: tcp, tcp: {{preferred_ip_protocol: ip4}}}}
jobs:
  - job_name: tcp
    module: tcp
    static_configs: [{{targets: ["127.0.0.1:{target}"]}}]
remote_write:
  - url: http://127.0.0.1:{receiver}/api/v1/write
    queue_config: {{max_shards: 1}}
"#
        ),
    );
    agg.start(&mut scene, "aggregator-0", &[]);
    start_agent(
        &mut scene,
        "edge",
        &format!(
            "agent: {{id: edge}}\naggregators: [{{address: \"{}\"}}]\n",
            agg.grpc()
        ),
    );
    let web = agg.web();
    scene.wait_until(
        "samples queued for the receiver",
        WAIT,
        || match metric_sum(&web, "sonde_remote_write_queue_samples", &[])? {
            n if n >= 20.0 => Ok(()),
            n => Err(format!("{n} queued")),
        },
    );
    scene.kill("aggregator-0");

    // One block of the queue no longer decodes, as a bad sector or a torn copy leaves it.
    {
        let db = rusqlite::Connection::open(agg.data.join("aggregator.db")).expect("open the db");
        let changed = db
            .execute(
                "UPDATE rw_blocks SET data = x'01ff' WHERE id = (SELECT MIN(id) FROM rw_blocks)",
                [],
            )
            .expect("damage a block");
        assert_eq!(changed, 1);
    }
    agg.start(&mut scene, "aggregator-1", &[]);
    let damaged = scene.wait_until("the damaged block counted", WAIT, || {
        match dropped(&web, "damaged")? {
            n if n > 0.0 => Ok(n),
            n => Err(format!("reason=damaged is {n}")),
        }
    });
    assert_eq!(
        dropped(&web, "invalid_labels"),
        Ok(0.0),
        "{damaged} damaged samples"
    );
    let log = scene.process("aggregator-1").log();
    assert!(
        log.contains("reason=\\\"damaged\\\"") || log.contains("reason=\"damaged\""),
        "{log}"
    );
}

fn history(web: &str, job: &str, instance: &str) -> Result<serde_json::Value, String> {
    let url = format!(
        "{web}/api/v1/targets/history?job={}&instance={}",
        encode(job),
        encode(instance)
    );
    match http_get(&url)? {
        (200, body) => serde_json::from_str::<serde_json::Value>(&body)
            .map(|v| v["data"].clone())
            .map_err(|e| e.to_string()),
        other => Err(format!("{other:?}")),
    }
}

/// The target's history once it is up again and its agent has reported for a while.
fn history_when_up(scene: &mut Scene, web: &str, target: &str) -> serde_json::Value {
    let mut up_since: Option<Instant> = None;
    scene.wait_until("the target up for 3 s", WAIT, || {
        let h = history(web, "shop", target)?;
        if h["state"] != "up" {
            up_since = None;
            return Err(format!("state {}", h["state"]));
        }
        let since = *up_since.get_or_insert_with(Instant::now);
        if since.elapsed() < Duration::from_secs(3) {
            return Err("up only just now".into());
        }
        Ok(h)
    })
}

fn assert_no_change_without_change(h: &serde_json::Value) {
    let events = h["events"].as_array().expect("events");
    for e in events {
        assert_ne!(
            e["state"], e["previous"],
            "a state change to the same state: {e}\nall: {h:#}"
        );
    }
    assert_eq!(events.len(), 1, "only the first up is a change: {h:#}");
}

fn gaps(h: &serde_json::Value) -> Vec<(i64, i64)> {
    h["aggregator_gaps"]
        .as_array()
        .unwrap_or_else(|| panic!("no aggregator_gaps in {h:#}"))
        .iter()
        .map(|g| {
            (
                g["from_ms"].as_i64().expect("from_ms"),
                g["to_ms"].as_i64().expect("to_ms"),
            )
        })
        .collect()
}

#[test]
fn an_aggregator_restart_is_a_gap_in_the_history_not_an_incident() {
    let mut scene = Scene::new("storage-restart-history");
    let nginx = start_nginx(&mut scene, "nginx");
    let target = format!("http://127.0.0.1:{nginx}/");
    let agg = RestartableAggregator::new(
        &scene,
        "aggregator",
        &format!(
            r#"global: {{scrape_interval: 1s, scrape_timeout: 1s}}
modules:
  http_2xx: {{prober: http, http: {{preferred_ip_protocol: ip4}}}}
jobs:
  - job_name: shop
    module: http_2xx
    static_configs: [{{targets: ["{target}"]}}]
"#
        ),
    );
    agg.start(&mut scene, "aggregator-0", &[]);
    start_agent(
        &mut scene,
        "edge",
        &format!(
            "agent: {{id: edge}}\naggregators: [{{address: \"{}\"}}]\n",
            agg.grpc()
        ),
    );
    let web = agg.web();
    let before = history_when_up(&mut scene, &web, &target);
    assert_no_change_without_change(&before);

    // A graceful stop, three seconds down, a start.
    scene
        .process("aggregator-0")
        .terminate(Duration::from_secs(30));
    let stopped_at = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    agg.start(&mut scene, "aggregator-1", &[]);
    let down_for = stopped_at.elapsed().as_millis() as i64;
    let after_stop = history_when_up(&mut scene, &web, &target);
    assert_no_change_without_change(&after_stop);
    let found = gaps(&after_stop);
    assert_eq!(found.len(), 1, "one gap: {after_stop:#}");
    let (from, to) = found[0];
    assert!(
        to - from >= 2_500 && to - from <= down_for + 1_000,
        "a gap of {} ms for a stop of {down_for} ms",
        to - from
    );

    // A SIGKILL: the gap starts at the last sign of life, at most seconds before.
    std::thread::sleep(Duration::from_secs(6));
    scene.kill("aggregator-1");
    let killed_at = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    agg.start(&mut scene, "aggregator-2", &[]);
    let down_for = killed_at.elapsed().as_millis() as i64;
    let after_kill = history_when_up(&mut scene, &web, &target);
    assert_no_change_without_change(&after_kill);
    let found = gaps(&after_kill);
    assert_eq!(found.len(), 2, "two gaps: {after_kill:#}");
    let (from, to) = found[1];
    assert!(
        to - from >= 2_500 && to - from <= down_for + 6_000,
        "a gap of {} ms for a kill of {down_for} ms",
        to - from
    );
    // Up all the time it was watched: the gaps count neither way.
    assert_eq!(after_kill["uptime"]["1h"], 1.0, "{after_kill:#}");
    let timeline = after_kill["timeline"].as_array().expect("timeline");
    assert!(timeline.iter().all(|s| s["state"] == "up"), "{timeline:?}");
    assert_eq!(timeline.len(), 3, "up, gap, up, gap, up: {timeline:?}");

    // The target's page shows the gaps among its incidents, as gaps.
    let (status, page) = http_get(&format!(
        "{web}/target?job=shop&instance={}",
        encode(&target)
    ))
    .expect("the target page");
    assert_eq!(status, 200);
    assert_eq!(page.matches("<tr class=\"gap\"").count(), 2, "{page}");
    assert_eq!(page.matches("<tr class=\"event\"").count(), 1, "{page}");
    assert!(page.contains("aggregator not running from"), "{page}");
}

/// The bytes of text the history's tables hold: a floor under what they weigh on disk.
fn history_text_bytes(db: &Path) -> Result<u64, String> {
    let conn =
        rusqlite::Connection::open_with_flags(db, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .map_err(|e| e.to_string())?;
    conn.query_row(
        "SELECT (SELECT COALESCE(SUM(octet_length(job) + octet_length(instance)
                    + octet_length(state) + octet_length(views)), 0) FROM target_events)
              + (SELECT COALESCE(SUM(octet_length(job) + octet_length(instance)
                    + octet_length(agent)), 0) FROM target_latency)",
        [],
        |r| r.get::<_, i64>(0),
    )
    .map(|n| n as u64)
    .map_err(|e| e.to_string())
}

#[test]
fn history_with_big_rows_stays_under_max_size_in_bytes() {
    let mut scene = Scene::new("storage-history-bytes");
    let nginx = start_nginx(&mut scene, "nginx");
    // Ten targets whose names weigh 2 KB each: a state change of one is a row of 2 KB,
    // which the bound once counted as 160 bytes.
    let targets: Vec<String> = (0..10)
        .map(|i| format!("http://127.0.0.1:{nginx}/flip?{i}{}", "x".repeat(2_000)))
        .collect();
    const MAX_SIZE: u64 = 200_000;
    let agg = RestartableAggregator::new(
        &scene,
        "aggregator",
        &format!(
            r#"global: {{scrape_interval: 1s, scrape_timeout: 1s}}
modules:
  http_2xx: {{prober: http, http: {{preferred_ip_protocol: ip4}}}}
jobs:
  - job_name: shop
    module: http_2xx
    static_configs: [{{targets: [{}]}}]
history: {{max_size: {MAX_SIZE}}}
"#,
            targets
                .iter()
                .map(|t| format!("\"{t}\""))
                .collect::<Vec<_>>()
                .join(", ")
        ),
    );
    let started = Instant::now();
    agg.start(&mut scene, "aggregator", &[]);
    start_agent(
        &mut scene,
        "edge",
        &format!(
            "agent: {{id: edge}}\naggregators: [{{address: \"{}\"}}]\n",
            agg.grpc()
        ),
    );
    let web = agg.web();
    let db = agg.data.join("aggregator.db");
    // Every flip of nginx is a change of all ten targets: about 22 KB of text.
    let flip = nginx_flip_file(&scene, "nginx");
    let mut most = 0;
    let mut flips = 0;
    while most <= MAX_SIZE + MAX_SIZE / 4 && started.elapsed() < Duration::from_secs(50) {
        let want = if flips % 2 == 0 { "down" } else { "up" };
        if want == "down" {
            std::fs::write(&flip, "down").expect("flip nginx down");
        } else {
            std::fs::remove_file(&flip).expect("flip nginx up");
        }
        scene.wait_until(&format!("every target {want}"), WAIT, || {
            for t in &targets {
                let h = history(&web, "shop", t)?;
                if h["state"] != want {
                    return Err(format!("state {}", h["state"]));
                }
            }
            Ok(())
        });
        flips += 1;
        most = most.max(history_text_bytes(&db).unwrap_or(0));
    }
    assert!(
        most > MAX_SIZE,
        "the history reached only {most} bytes of text after {flips} flips"
    );
    // The first pruning runs a minute after the start; then the history holds less than
    // history.max_size, counting its text alone.
    let under = scene.wait_until(
        "the history under history.max_size",
        Duration::from_secs(60),
        || match history_text_bytes(&db)? {
            n if n <= MAX_SIZE => Ok(n),
            n => Err(format!("{n} bytes of text, bound {MAX_SIZE}")),
        },
    );
    println!("history: {most} bytes of text at most, {under} after pruning, {flips} flips");
    // The newest changes are what stays.
    let h = history(&web, "shop", &targets[0]).expect("history");
    assert!(!h["events"].as_array().expect("events").is_empty(), "{h:#}");
}
