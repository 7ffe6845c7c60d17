//! Remote write 2.0, and the fallback to 1.0 for a receiver that does not speak it.

use super::*;

fn v2_config(url: &str) -> RemoteWriteConfig {
    let mut cfg = config(url);
    cfg.protobuf_message = ProtobufMessage::RequestV2;
    cfg
}

#[tokio::test]
async fn sends_remote_write_2_to_a_receiver_that_speaks_it() {
    let rx = Receiver::speaking(Speaks::Both).await;
    let writer = start(v2_config(&rx.url()));
    writer.push(vec![sample("up", 1000), sample("probe_success", 1000)]);
    eventually("the samples", || writer.status().sent_samples == 2).await;
    let (_, h, _) = rx.attempt(0);
    assert_eq!(
        h["content-type"],
        "application/x-protobuf;proto=io.prometheus.write.v2.Request"
    );
    assert_eq!(h["x-prometheus-remote-write-version"], "2.0.0");
    assert_eq!(h["content-encoding"], "snappy");
    assert!(
        rx.outcomes().iter().all(|o| *o == ("2.0", 204)),
        "{:?}",
        rx.outcomes()
    );
    let mut got = rx.accepted_samples();
    got.sort();
    assert_eq!(got, vec![flat("probe_success", 1000), flat("up", 1000)]);
    let status = writer.status();
    assert_eq!(status.protobuf_message, "io.prometheus.write.v2.Request");
    assert_eq!(
        counter(&writer, "sonde_remote_write_protocol_fallbacks_total", None),
        0.0
    );
    writer.shutdown(Duration::from_secs(1)).await;
}

/// Everything the receiver stored, sorted, and that it was stored once.
fn assert_stored_once(rx: &Receiver, want: &[Flat]) {
    let mut got = rx.accepted_samples();
    got.sort();
    let mut want = want.to_vec();
    want.sort();
    assert_eq!(got, want);
}

#[tokio::test]
async fn falls_back_to_1_0_on_415() {
    let rx = Receiver::speaking(Speaks::V1Strict).await;
    let writer = start(v2_config(&rx.url()));
    let mut want = Vec::new();
    for t in 1..=3 {
        writer.push(wave(8, t));
        want.extend((0..8).map(|i| flat(&format!("m{i}"), t)));
    }
    eventually("the samples", || writer.status().sent_samples == 24).await;
    assert_stored_once(&rx, &want);
    let outcomes = rx.outcomes();
    let first_ok = outcomes.iter().position(|o| o.1 == 204).unwrap();
    assert!(first_ok >= 1, "{outcomes:?}");
    assert!(
        outcomes[..first_ok].iter().all(|o| o.1 == 415),
        "{outcomes:?}"
    );
    assert!(
        outcomes[first_ok..].iter().all(|o| o.1 == 204),
        "{outcomes:?}"
    );
    // Every request after the fallback is 1.0.
    for i in first_ok..rx.attempts() {
        let (_, h, _) = rx.attempt(i);
        assert_eq!(h["content-type"], "application/x-protobuf");
        assert_eq!(h["x-prometheus-remote-write-version"], "0.1.0");
    }
    assert_eq!(writer.status().protobuf_message, "prometheus.WriteRequest");
    assert_eq!(
        counter(&writer, "sonde_remote_write_protocol_fallbacks_total", None),
        1.0
    );
    assert_eq!(writer.status().dropped_samples, 0);
    assert_eq!(writer.configured_message(), ProtobufMessage::RequestV2);
    writer.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn falls_back_to_1_0_on_2xx_without_the_written_headers() {
    // Like Prometheus 2.42: reads the 2.0 body as 1.0, finds nothing, answers 204.
    let rx = Receiver::speaking(Speaks::V1Lenient).await;
    let writer = start(v2_config(&rx.url()));
    let mut want = Vec::new();
    for t in 1..=3 {
        writer.push(wave(8, t));
        want.extend((0..8).map(|i| flat(&format!("m{i}"), t)));
    }
    eventually("the samples", || writer.status().sent_samples == 24).await;
    assert_stored_once(&rx, &want);
    let empty = rx
        .accepted()
        .iter()
        .filter(|r| r.timeseries.is_empty())
        .count();
    assert!(empty >= 1, "no 2.0 request reached the receiver");
    assert_eq!(writer.status().protobuf_message, "prometheus.WriteRequest");
    assert_eq!(
        counter(&writer, "sonde_remote_write_protocol_fallbacks_total", None),
        1.0
    );
    writer.shutdown(Duration::from_secs(1)).await;
}

/// The 2.0 body read by another implementation: the spec's types.proto compiled by
/// grpcio-tools' protoc, parsed by the `protobuf` package, snappy by `cramjam`
/// (`tests/rw2/decode.py`). Fails, never skips, when they are missing.
#[test]
fn remote_write_2_body_decodes_with_an_independent_implementation() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf();
    let script = root.join("tests/rw2/decode.py");
    let stale = f64::from_bits(STALE_NAN_BITS);
    let series = vec![
        Series {
            labels: labels(&[
                ("__name__", "probe_success"),
                ("job", "web"),
                ("instance", "http://127.0.0.1:8080/"),
                ("agent", "edge-1"),
                ("cluster", "eu1"),
            ]),
            samples: vec![
                (1_700_000_000_000, 1.0),
                (1_700_000_001_000, 0.0),
                (1_700_000_002_000, stale),
            ],
        },
        Series {
            labels: labels(&[
                ("__name__", "probe_http_duration_seconds"),
                ("job", "web"),
                ("phase", "connect"),
                ("empty", ""),
            ]),
            samples: vec![(1_700_000_000_000, 0.000_25)],
        },
        Series {
            labels: labels(&[("__name__", "up"), ("job", "web")]),
            samples: vec![(1_700_000_000_000, 1.0)],
        },
        Series {
            labels: labels(&[("__name__", "sonde_job_missing"), ("job", "dns")]),
            samples: vec![(-5, 0.0)],
        },
    ];
    let body = encode_v2::encode(&series).unwrap();
    let dir = temp_dir("rw2");
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("request.bin");
    std::fs::write(&file, &body).unwrap();
    let output = std::process::Command::new("python3")
        .arg(&script)
        .arg(&file)
        .output();
    let install = "install them with `python3 -m pip install grpcio-tools protobuf cramjam` \
                   (bash scripts/test.sh does it)";
    let output = match output {
        Ok(o) => o,
        Err(e) => panic!(
            "cannot run python3 ({e}): the remote write 2.0 interop test needs python3 with \
             the PyPI packages grpcio-tools, protobuf and cramjam; {install}"
        ),
    };
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        output.status.success(),
        "{} failed ({}): {stderr}\nIf a package is missing, {install}.",
        script.display(),
        output.status
    );
    let json: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap_or_else(|e| {
        panic!(
            "decode.py printed no JSON ({e}): {}",
            String::from_utf8_lossy(&output.stdout)
        )
    });
    assert_eq!(
        json["symbols"][0], "",
        "symbols[0] must be the empty string"
    );
    let got = json["timeseries"].as_array().unwrap();
    assert_eq!(got.len(), series.len());
    for (got, want) in got.iter().zip(&series) {
        let mut want_labels = want.labels.clone();
        encode::normalize_labels(&mut want_labels);
        let got_labels: Vec<(String, String)> =
            serde_json::from_value(got["labels"].clone()).unwrap();
        assert_eq!(got_labels, want_labels);
        let got_samples: Vec<(i64, u64)> = serde_json::from_value(got["samples"].clone()).unwrap();
        let want_samples: Vec<(i64, u64)> = want
            .samples
            .iter()
            .map(|&(t, v)| (t, v.to_bits()))
            .collect();
        assert_eq!(got_samples, want_samples);
        let name = &want_labels.iter().find(|(k, _)| k == "__name__").unwrap().1;
        let (_, help) = encode_v2::metric_metadata(name).unwrap();
        assert_eq!(got["metadata"]["type"], "METRIC_TYPE_GAUGE", "{name}");
        assert_eq!(got["metadata"]["help"], help, "{name}");
        assert_eq!(got["metadata"]["unit"], "", "{name}");
    }
    let _ = std::fs::remove_dir_all(&dir);
}
