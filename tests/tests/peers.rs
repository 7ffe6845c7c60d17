//! The real peers the end-to-end test runs sonde against, checked on their own: when the
//! end-to-end test fails, this one tells whether the harness and the peers are to blame.

use sonde_tests::{
    Scene, dns_query_a, http_get, prometheus_expect_empty, prometheus_query, repo_path,
    start_dnsmasq, start_nginx, start_prometheus,
};
use std::net::{Ipv4Addr, SocketAddr};
use std::time::Duration;

#[test]
fn prometheus_nginx_dnsmasq_start_and_answer() {
    let mut scene = Scene::new("peers");
    let rules = [
        repo_path("deploy/prometheus/sonde-alerts.yml"),
        repo_path("deploy/prometheus/compat/existing-alerts.yml"),
    ];
    let prom = start_prometheus(&mut scene, "prometheus", &rules);
    let nginx = start_nginx(&mut scene, "nginx");
    let dns = start_dnsmasq(&mut scene, "dnsmasq");

    // nginx: / is 200, /missing is 404.
    assert_eq!(
        http_get(&format!("http://127.0.0.1:{nginx}/")).unwrap(),
        (200, "ok\n".to_string())
    );
    assert_eq!(
        http_get(&format!("http://127.0.0.1:{nginx}/missing"))
            .unwrap()
            .0,
        404
    );

    // dnsmasq: example.test and names under it are 127.0.0.1; anything else is refused.
    let server = SocketAddr::from((Ipv4Addr::LOCALHOST, dns));
    assert_eq!(
        dns_query_a(server, "www.example.test").unwrap(),
        [Ipv4Addr::LOCALHOST]
    );
    let other = dns_query_a(server, "example.org");
    assert!(
        other.as_ref().map_or(true, Vec::is_empty),
        "example.org: {other:?}"
    );

    // Prometheus loaded sonde's rules and the seed alerts; with no data at all the absent()
    // seed alert fires (why it is not loaded by default), and none of sonde's own.
    let (status, body) = http_get(&format!("{prom}/api/v1/rules")).unwrap();
    assert_eq!(status, 200, "{body}");
    for alert in [
        "PrometheusTargetMissing",
        "PrometheusAlertmanagerJobMissing",
        "SondeTargetDown",
        "SondeJobMissing",
        "SondeAgentDown",
        "SondeAgentClockSkew",
        "SondeResultsRefused",
        "SondeAgentBufferDropping",
        "SondeRemoteWriteQueueGrowing",
        "SondeRemoteWriteDropping",
    ] {
        assert!(
            body.contains(&format!("\"name\":\"{alert}\"")),
            "{alert} not loaded: {body}"
        );
    }
    let p = prom.as_str();
    scene.wait_until(
        "PrometheusAlertmanagerJobMissing firing in an empty Prometheus",
        Duration::from_secs(30),
        || {
            let q = r#"ALERTS{alertname="PrometheusAlertmanagerJobMissing",alertstate="firing"}"#;
            match prometheus_query(p, q)?.len() {
                1 => Ok(()),
                n => Err(format!("{q}: {n} series")),
            }
        },
    );

    prometheus_expect_empty(p, r#"ALERTS{alertname=~"Sonde.*"}"#)
        .expect("no default alert fires with no problem");

    // A stopped peer is really gone.
    scene.kill("nginx");
    assert!(http_get(&format!("http://127.0.0.1:{nginx}/")).is_err());
}
