use super::*;
use crate::config::AggregatorConfig;

fn data(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/data/import_prometheus")
        .join(name)
}

fn import(name: &str) -> Conversion {
    import_file(&data(name), None).unwrap()
}

/// A scratch directory of this test's own, emptied first.
fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sonde-import-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// `check-config`'s verdict on `config`: the errors, none when it loads.
fn check_errors(dir: &Path, config: &str) -> Vec<String> {
    let file = dir.join("sonde-aggregator.yml");
    std::fs::write(&file, config).unwrap();
    let (_, problems) = AggregatorConfig::check(&file);
    problems.errors.iter().map(ToString::to_string).collect()
}

fn notes_about<'a>(c: &'a Conversion, needle: &str) -> Vec<&'a String> {
    c.notes.iter().filter(|n| n.contains(needle)).collect()
}

#[test]
fn blackbox_readme_job_becomes_a_sonde_job_that_loads() {
    let c = import("blackbox_readme.yml");
    assert_eq!((c.converted, c.scrape_jobs), (1, 1));
    let body: String = c
        .config
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .map(|l| format!("{l}\n"))
        .collect();
    assert_eq!(
        body,
        "global:\n  scrape_interval: 1m\nmodules:\n  http_2xx:\n    prober: http\njobs:\n  - job_name: blackbox\n    module: http_2xx\n    static_configs:\n      - targets:\n          - http://prometheus.io\n          - https://prometheus.io\n          - http://example.com:8080\n",
        "whole output:\n{}",
        c.config
    );
    // The only note: which modules the jobs need, since no blackbox.yml was given.
    assert_eq!(c.notes.len(), 1, "{:#?}", c.notes);
    assert!(c.notes[0].contains("http_2xx") && c.notes[0].contains("--blackbox.config"));
    let dir = scratch("readme");
    assert_eq!(check_errors(&dir, &c.config), Vec::<String>::new());
    let (config, _) = AggregatorConfig::check(&dir.join("sonde-aggregator.yml"));
    let config = config.unwrap();
    assert_eq!(config.jobs[0].config.static_configs[0].targets.len(), 3);
    assert_eq!(config.scrape_interval, std::time::Duration::from_secs(60));
}

#[test]
fn relabeling_other_than_the_usual_rewrite_is_carried_in_order() {
    let c = import("blackbox_readme_dns_sd.yml");
    assert_eq!(c.converted, 1);
    let text = &c.config;
    assert!(
        text.contains(
            "    dns_sd_configs:\n      - names:\n          - example.com\n          - prometheus.io\n        type: A\n        port: 443\n"
        ),
        "{text}"
    );
    assert!(
        text.contains(
            "    relabel_configs:\n      - source_labels:\n          - __address__\n        target_label: __param_target\n        replacement: \"https://$1/\"\n      - source_labels:\n          - __param_target\n        target_label: instance\n      - target_label: __address__\n        replacement: \"127.0.0.1:9115\"\n      - source_labels:\n          - __meta_dns_name\n        target_label: __param_hostname\n"
        ),
        "{text}"
    );
    assert!(
        !text.contains("metrics_path") && !text.contains("params"),
        "{text}"
    );
}

#[test]
fn prometheus_kubernetes_example_keeps_its_two_probing_jobs() {
    let c = import("prometheus_kubernetes.yml");
    assert_eq!((c.converted, c.scrape_jobs), (2, 3));
    let left_out = notes_about(&c, "\"kubernetes-apiservers\": not a blackbox job");
    assert_eq!(left_out.len(), 1, "{:#?}", c.notes);
    assert!(
        left_out[0].contains("prometheus_kubernetes.yml:6:5:"),
        "{}",
        left_out[0]
    );
    for job in ["kubernetes-services", "kubernetes-ingresses"] {
        assert!(
            c.config
                .contains(&format!("  - job_name: {job}\n    module: http_2xx\n"))
        );
    }
    assert!(
        c.config
            .contains("    kubernetes_sd_configs:\n      - role: service\n")
    );
    assert!(
        c.config
            .contains("        regex: \"__meta_kubernetes_service_label_(.+)\"\n")
    );
    assert!(
        c.config
            .contains("        replacement: \"${1}://${2}${3}\"\n")
    );
    // Nothing of the apiservers job leaks in.
    assert!(!c.config.contains("tls_config:") && !c.config.contains("scheme:"));
}

#[test]
fn prometheus_example_has_nothing_to_convert() {
    let c = import("prometheus_example.yml");
    assert_eq!((c.converted, c.scrape_jobs), (0, 1));
    assert_eq!(
        notes_about(&c, "job \"prometheus\": not a blackbox job").len(),
        1,
        "{:#?}",
        c.notes
    );
    assert!(notes_about(&c, "global.evaluation_interval").len() == 1);
}

#[test]
fn blackbox_config_given_is_loaded_as_the_modules_file() {
    let dir = scratch("modules-file");
    let blackbox = dir.join("blackbox.yml");
    std::fs::write(
        &blackbox,
        "modules:\n  http_2xx:\n    prober: http\n    timeout: 5s\n  tcp_connect:\n    prober: tcp\n",
    )
    .unwrap();
    let prometheus = dir.join("prometheus.yml");
    std::fs::write(
        &prometheus,
        "global: {scrape_interval: 30s, scrape_timeout: 5s, external_labels: {site: eu1}}\nscrape_configs:\n  - job_name: web\n    metrics_path: /probe\n    params: {module: [http_2xx]}\n    static_configs: [{targets: ['http://127.0.0.1:8080/'], labels: {team: a}}]\n  - job_name: ssh\n    metrics_path: /probe\n    params: {module: [ssh_check]}\n    scrape_interval: 1m\n    static_configs: [{targets: ['127.0.0.1:22']}]\n",
    )
    .unwrap();
    let c = import_file(&prometheus, Some(&blackbox)).unwrap();
    assert_eq!(c.converted, 2);
    assert!(
        c.config
            .contains(&format!("modules_file: {}\n", blackbox.display())),
        "{}",
        c.config
    );
    assert!(!c.config.contains("modules:\n"));
    assert!(c.config.contains(
        "global:\n  scrape_interval: 30s\n  scrape_timeout: 5s\n  external_labels:\n    site: eu1\n"
    ));
    assert!(c.config.contains("    interval: 1m\n"));
    let missing = notes_about(&c, "does not define: ssh_check");
    assert_eq!(missing.len(), 1, "{:#?}", c.notes);

    // With the module added, the output loads as it is, from anywhere.
    std::fs::write(
        &blackbox,
        "modules:\n  http_2xx: {prober: http}\n  ssh_check: {prober: tcp}\n",
    )
    .unwrap();
    let c = import_file(&prometheus, Some(&blackbox)).unwrap();
    assert!(c.notes.is_empty(), "{:#?}", c.notes);
    let elsewhere = scratch("modules-file-elsewhere");
    assert_eq!(check_errors(&elsewhere, &c.config), Vec::<String>::new());
}

#[test]
fn every_field_not_carried_is_named_with_its_job_and_place() {
    let text = "scrape_configs:
  - job_name: probes
    metrics_path: /probe
    params:
      module: [http_2xx, http_post_2xx]
      hostname: [example.com]
    scheme: https
    tls_config: {insecure_skip_verify: true}
    honor_labels: true
    sample_limit: 100
    metric_relabel_configs: [{action: labeldrop, regex: foo}]
    consul_sd_configs: [{server: 'localhost:8500'}]
    file_sd_configs: [{files: [targets/*.yml]}]
    relabel_configs:
      - source_labels: [__address__]
        target_label: __param_target
      - source_labels: [__param_target]
        target_label: instance
      - target_label: __address__
        replacement: exporter:9115
  - job_name: modules_by_target
    params: {}
    relabel_configs:
      - source_labels: [__address__]
        target_label: __param_target
      - source_labels: [mod]
        target_label: __param_module
";
    let file = Path::new("/etc/prometheus/prometheus.yml");
    let c = convert(file, text, None).unwrap();
    assert_eq!(c.converted, 2);
    for (field, why) in [
        ("params.module lists 2 modules", "runs the first, http_2xx"),
        ("params.hostname", "not carried"),
        ("scheme", "how Prometheus reached the exporter"),
        ("tls_config", "how Prometheus reached the exporter"),
        ("honor_labels", "not carried"),
        ("sample_limit", "not carried"),
        ("metric_relabel_configs", "not carried"),
        ("consul_sd_configs", "no such discovery"),
    ] {
        let found = notes_about(
            &c,
            &format!("/etc/prometheus/prometheus.yml:2:5: job \"probes\": {field}"),
        );
        assert_eq!(found.len(), 1, "{field}: {:#?}", c.notes);
        assert!(found[0].contains(why), "{}", found[0]);
    }
    // The usual rewrite is what a sonde job does anyway: it goes.
    let probes = c
        .config
        .split("job_name: modules_by_target")
        .next()
        .unwrap();
    assert!(!probes.contains("relabel_configs"), "{probes}");
    assert!(probes.contains("      - files:\n          - \"/etc/prometheus/targets/*.yml\"\n"));
    // A job without params.module runs blackbox's default module; one per target cannot be.
    assert!(
        c.config
            .contains("  - job_name: modules_by_target\n    module: http_2xx\n")
    );
    assert_eq!(notes_about(&c, "no params.module").len(), 1);
    assert_eq!(notes_about(&c, "__param_module").len(), 1);
    assert_eq!(
        notes_about(&c, "job \"modules_by_target\": no target source").len(),
        1
    );
}

#[test]
fn unreadable_or_broken_files_are_errors_with_their_place() {
    let e = import_file(Path::new("/nonexistent/prometheus.yml"), None).unwrap_err();
    assert!(
        e.to_string()
            .contains("cannot read /nonexistent/prometheus.yml"),
        "{e}"
    );
    let e = convert(
        Path::new("p.yml"),
        "scrape_configs:\n  - job_name: a\n    params: {module: [x]\n",
        None,
    )
    .unwrap_err();
    assert!(e.to_string().starts_with("p.yml:"), "{e}");
    let e = import_file(
        &data("blackbox_readme.yml"),
        Some(&data("prometheus_example.yml")),
    )
    .unwrap_err();
    assert!(e.to_string().contains("has no `modules:`"), "{e}");
    let c = convert(Path::new("p.yml"), "# nothing\n", None).unwrap();
    assert_eq!((c.converted, c.scrape_jobs), (0, 0));
}
