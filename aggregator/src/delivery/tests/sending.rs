//! Batching, retries, refusals and shutdown.

use super::*;

#[tokio::test]
async fn sends_protocol_headers_auth_and_external_labels() {
    let rx = Receiver::start().await;
    let mut cfg = config(&rx.url());
    cfg.headers
        .insert("X-Scope-OrgID".into(), "tenant-1".into());
    cfg.bearer_token = Some(config::Secret("s3cret".into()));
    let external: Labels = [("cluster", "eu1"), ("job", "ignored")]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v.to_string()))
        .collect();
    let writer = RemoteWriter::start(cfg, &external, memory()).unwrap();
    writer.push(vec![sample("up", 1000)]);
    eventually("the sample", || writer.status().sent_samples == 1).await;

    let (_, h, _) = rx.attempt(0);
    assert_eq!(h["content-encoding"], "snappy");
    assert_eq!(h["content-type"], "application/x-protobuf");
    assert_eq!(h["x-prometheus-remote-write-version"], "0.1.0");
    assert_eq!(
        h["user-agent"],
        format!("sonde/{}", env!("CARGO_PKG_VERSION")).as_str()
    );
    assert_eq!(h["authorization"], "Bearer s3cret");
    assert_eq!(h["x-scope-orgid"], "tenant-1");
    assert_eq!(h["host"], rx.addr.to_string().as_str());
    // The series' own job wins over the external one.
    assert_eq!(
        rx.accepted_samples(),
        vec![(
            labels(&[("__name__", "up"), ("cluster", "eu1"), ("job", "web")]),
            1000,
            100f64.to_bits()
        )]
    );
    assert_eq!(
        counter(&writer, "sonde_remote_write_samples_sent_total", None),
        1.0
    );
    let sent = writer
        .families()
        .into_iter()
        .find(|f| f.name == "sonde_remote_write_samples_sent_total")
        .unwrap();
    assert_eq!(
        sent.samples[0].0,
        labels(&[("remote_name", "test"), ("url", &rx.url())])
    );
    let status = writer.status();
    assert_eq!((status.sent_samples, status.queued_samples), (1, 0));
    assert!(status.last_success.is_some() && !status.failing);
    writer.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn batches_by_size_then_shutdown_flushes_the_rest() {
    let rx = Receiver::start().await;
    let mut cfg = config(&rx.url());
    cfg.queue_config.max_samples_per_send = 10;
    cfg.queue_config.batch_send_deadline = PromDuration::from_secs(3600);
    let writer = start(cfg);
    writer.push((1..=25).map(|t| sample("m", t)).collect());
    eventually("two full batches", || rx.accepted().len() == 2).await;
    // The last 5 wait for a full batch or the (hour-long) deadline.
    tokio::time::sleep(Duration::from_millis(200)).await;
    let sizes = |rx: &Receiver| -> Vec<usize> {
        rx.accepted()
            .iter()
            .map(|r| r.timeseries.iter().map(|ts| ts.samples.len()).sum())
            .collect()
    };
    assert_eq!(sizes(&rx), [10, 10]);
    assert_eq!(writer.status().queued_samples, 5);

    writer.shutdown(Duration::from_secs(5)).await;
    assert_eq!(sizes(&rx), [10, 10, 5]);
    let want: Vec<Flat> = (1..=25).map(|t| flat("m", t)).collect();
    assert_eq!(rx.accepted_samples(), want);
}

#[tokio::test]
async fn batches_by_deadline() {
    let rx = Receiver::start().await;
    let mut cfg = config(&rx.url());
    cfg.queue_config.batch_send_deadline = PromDuration::from_millis(300);
    // One shard: both series in the same request.
    cfg.queue_config.max_shards = 1;
    let writer = start(cfg);
    let pushed = std::time::Instant::now();
    writer.push(vec![sample("a", 1), sample("b", 1)]);
    tokio::time::sleep(Duration::from_millis(100)).await;
    writer.push(vec![sample("a", 2)]);
    eventually("the deadline batch", || rx.accepted().len() == 1).await;
    let (at, _, req) = rx.attempt(0);
    let waited = at - pushed;
    assert!(
        waited >= Duration::from_millis(300),
        "sent after {waited:?}"
    );
    assert!(waited < Duration::from_secs(3), "sent after {waited:?}");
    // One request with every due sample, each series' in time order.
    let got = flatten(std::slice::from_ref(&req));
    assert_eq!(got.len(), 3);
    let of = |name: &str| -> Vec<i64> {
        got.iter()
            .filter(|(labels, _, _)| labels.iter().any(|(k, v)| k == "__name__" && v == name))
            .map(|(_, ts, _)| *ts)
            .collect()
    };
    assert_eq!((of("a"), of("b")), (vec![1, 2], vec![1]));
    writer.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn retries_500_and_429_without_losing_or_doubling() {
    let rx = Receiver::start().await;
    rx.script([Reply::status(500), Reply::status(429), Reply::status(503)]);
    let mut cfg = config(&rx.url());
    cfg.queue_config.max_shards = 1;
    let writer = start(cfg);
    let mut want = Vec::new();
    let mut batch = Vec::new();
    for t in 1..=10 {
        batch.push(sample("a", t));
        batch.push(sample("b", t));
        want.push(flat("a", t));
        want.push(flat("b", t));
    }
    writer.push(batch);
    eventually("the retried batch", || writer.status().sent_samples == 20).await;
    assert_eq!(rx.attempts(), 4);
    let mut got = rx.accepted_samples();
    got.sort_by(|x, y| (&x.0, x.1).cmp(&(&y.0, y.1)));
    want.sort_by(|x, y| (&x.0, x.1).cmp(&(&y.0, y.1)));
    assert_eq!(got, want);
    assert_eq!(
        counter(&writer, "sonde_remote_write_samples_sent_total", None),
        20.0
    );
    assert_eq!(
        counter(&writer, "sonde_remote_write_samples_retried_total", None),
        60.0
    );
    assert_eq!(
        counter(&writer, "sonde_remote_write_requests_failed_total", None),
        3.0
    );
    let status = writer.status();
    assert!(!status.failing);
    assert_eq!(
        status.last_error.as_deref(),
        Some("HTTP 503 Service Unavailable")
    );
    assert_eq!(status.dropped_samples, 0);
    writer.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn honours_retry_after_up_to_max_backoff() {
    let rx = Receiver::start().await;
    let mut retry_after = Reply::status(429);
    retry_after.headers.push(("retry-after", "1".into()));
    rx.script([retry_after.clone()]);
    let mut cfg = config(&rx.url());
    cfg.queue_config.max_backoff = PromDuration::from_secs(5);
    let writer = start(cfg);
    writer.push(vec![sample("a", 1)]);
    eventually("the retry", || rx.accepted().len() == 1).await;
    let gap = {
        let log = rx.log.lock().unwrap();
        log.attempts[1].at - log.attempts[0].at
    };
    assert!(gap >= Duration::from_secs(1), "retried after {gap:?}");
    writer.shutdown(Duration::from_secs(1)).await;

    // An hour-long Retry-After is cut to max_backoff (40ms here).
    let rx = Receiver::start().await;
    retry_after.headers = vec![("retry-after", "3600".into())];
    rx.script([retry_after]);
    let writer = start(config(&rx.url()));
    writer.push(vec![sample("a", 1)]);
    eventually("the capped retry", || rx.accepted().len() == 1).await;
    let gap = {
        let log = rx.log.lock().unwrap();
        log.attempts[1].at - log.attempts[0].at
    };
    assert!(gap < Duration::from_secs(2), "retried after {gap:?}");
    writer.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn drops_a_batch_refused_with_400_and_counts_it() {
    let rx = Receiver::start().await;
    let mut refused = Reply::status(400);
    refused.body = "out of bounds\n".into();
    rx.script([refused]);
    let writer = start(config(&rx.url()));
    writer.push((1..=3).map(|t| sample("a", t)).collect());
    eventually("the refused request", || rx.attempts() == 1).await;
    eventually("the drop", || writer.status().dropped_samples == 3).await;
    writer.push(vec![sample("a", 4), sample("a", 5)]);
    eventually("the next batch", || rx.accepted().len() == 1).await;
    // Not retried: the refused samples were sent once and never again.
    assert_eq!(rx.attempts(), 2);
    assert_eq!(rx.accepted_samples(), vec![flat("a", 4), flat("a", 5)]);
    assert_eq!(
        counter(
            &writer,
            "sonde_remote_write_samples_dropped_total",
            Some("http_4xx")
        ),
        3.0
    );
    assert_eq!(
        counter(&writer, "sonde_remote_write_samples_retried_total", None),
        0.0
    );
    assert_eq!(
        writer.status().last_error.as_deref(),
        Some("HTTP 400: out of bounds")
    );
    writer.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn shutdown_gives_up_at_the_deadline() {
    let rx = Receiver::start().await;
    rx.set_fallback(Some(Reply::status(503)));
    let writer = start(config(&rx.url()));
    writer.push(vec![sample("a", 1)]);
    eventually("a failed attempt", || rx.attempts() >= 1).await;
    let started = std::time::Instant::now();
    writer.shutdown(Duration::from_millis(300)).await;
    let took = started.elapsed();
    assert!(took >= Duration::from_millis(250), "{took:?}");
    assert!(took < Duration::from_millis(1200), "{took:?}");
    assert!(rx.accepted().is_empty());
}

#[tokio::test]
async fn a_dead_endpoint_blocks_neither_push_nor_the_others() {
    // Accepts connections and never answers.
    let black_hole = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let dead_addr = black_hole.local_addr().unwrap();
    let hole = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = black_hole.accept().await {
            held.push(socket);
        }
    });
    let rx = Receiver::start().await;
    let mut dead = config(&format!("http://{dead_addr}/api/v1/write"));
    dead.name = Some("dead".into());
    let live = config(&rx.url());
    let writers = RemoteWriters::start(&[dead, live], &no_labels(), memory()).unwrap();

    let started = std::time::Instant::now();
    for chunk in 0..10 {
        writers.push(
            (0..1000)
                .map(|i| sample("m", chunk * 1000 + i + 1))
                .collect(),
        );
    }
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    eventually("the live endpoint", || {
        writers.status()[1].sent_samples == 10_000
    })
    .await;
    assert_eq!(rx.accepted_samples().len(), 10_000);
    let status = writers.status();
    assert_eq!(status[0].name, "dead");
    assert_eq!(status[0].sent_samples, 0);
    assert_eq!(status[0].queued_samples, 10_000);
    assert_eq!(status[1].sent_samples, 10_000);

    // One family per metric, a sample per endpoint.
    let families = writers.families();
    let sent = families
        .iter()
        .find(|f| f.name == "sonde_remote_write_samples_sent_total")
        .unwrap();
    assert_eq!(sent.samples.len(), 2);
    assert_eq!(
        families
            .iter()
            .filter(|f| f.name == "sonde_remote_write_samples_sent_total")
            .count(),
        1
    );

    let started = std::time::Instant::now();
    writers.shutdown(Duration::from_millis(200)).await;
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "{:?}",
        started.elapsed()
    );
    hole.abort();
}

#[tokio::test]
async fn start_refuses_invalid_config() {
    let err = RemoteWriter::start(RemoteWriteConfig::new("ftp://x/"), &no_labels(), memory())
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("http:// or https://"), "{err}");
}

#[tokio::test]
async fn a_refused_series_does_not_take_its_batch_down() {
    let rx = Receiver::start().await;
    rx.log.lock().unwrap().refuse_name = Some("bad".into());
    let mut cfg = config(&rx.url());
    cfg.queue_config.max_shards = 1;
    cfg.queue_config.batch_send_deadline = PromDuration::from_millis(200);
    let writer = start(cfg);
    let mut batch = wave(20, 1);
    batch.push(sample("bad", 1));
    batch.extend(wave(20, 2));
    batch.push(sample("bad", 2));
    writer.push(batch);
    eventually("the batch settled", || writer.status().queued_samples == 0).await;
    let got = per_series(&rx);
    assert_eq!(got.len(), 20, "{got:?}");
    assert!(got.values().all(|ts| ts == &[1, 2]));
    assert_eq!(
        counter(
            &writer,
            "sonde_remote_write_samples_dropped_total",
            Some("http_4xx")
        ),
        2.0
    );
    // Isolating one series among 21 takes a few requests, not 21.
    assert!(rx.attempts() <= 12, "{} requests", rx.attempts());
    writer.shutdown(Duration::from_secs(1)).await;
}
