//! The durable queue as the writer uses it: order, bounds, restarts, transactions.

use super::*;

#[tokio::test]
async fn drops_samples_not_newer_than_their_series() {
    let rx = Receiver::start().await;
    let mut cfg = config(&rx.url());
    cfg.queue_config.max_shards = 1;
    let writer = start(cfg);
    writer.push(vec![
        sample("a", 1000),
        sample("a", 2000),
        sample("a", 1500),
        sample("b", 1500),
        sample("a", 2000),
        sample("a", 3000),
    ]);
    eventually("the batch", || rx.accepted_samples().len() == 4).await;
    // The series' last timestamp is remembered after sending too.
    writer.push(vec![sample("a", 2500), sample("a", 4000)]);
    eventually("the second batch", || rx.accepted_samples().len() == 5).await;
    let got = per_series(&rx);
    assert_eq!(got["a"], [1000, 2000, 3000, 4000]);
    assert_eq!(got["b"], [1500]);
    assert_eq!(
        counter(
            &writer,
            "sonde_remote_write_samples_dropped_total",
            Some("out_of_order")
        ),
        3.0
    );
    writer.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn drops_samples_with_invalid_labels() {
    let rx = Receiver::start().await;
    let writer = start(config(&rx.url()));
    writer.push(vec![
        QSample::from_pairs(&[("job", "no-name")], 1, 1.0),
        sample("ok", 1),
    ]);
    eventually("the valid sample", || rx.accepted_samples().len() == 1).await;
    assert_eq!(rx.accepted_samples(), vec![flat("ok", 1)]);
    assert_eq!(
        counter(
            &writer,
            "sonde_remote_write_samples_dropped_total",
            Some("invalid_labels")
        ),
        1.0
    );
    writer.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn queue_bound_drops_the_oldest_while_the_endpoint_is_down() {
    let rx = Receiver::start().await;
    rx.set_fallback(Some(Reply::status(503)));
    let one = crate::storage::queue::labels::sample_bytes(&sample("m", 1).series.to_pairs());
    let mut cfg = config(&rx.url());
    cfg.queue_config.max_samples_per_send = 10;
    cfg.queue_config.max_queue_bytes = ByteSize(50 * one);
    let writer = start(cfg);
    writer.push((1..=50).map(|t| sample("m", t)).collect());
    // The first batch (1..=10) is now being retried.
    eventually("a few failed attempts", || rx.attempts() >= 3).await;
    writer.push((51..=100).map(|t| sample("m", t)).collect());
    assert_eq!(writer.status().queued_samples, 50);
    rx.set_fallback(None);
    eventually("the queue to drain", || writer.status().queued_samples == 0).await;

    let want: Vec<Flat> = (51..=100).map(|t| flat("m", t)).collect();
    assert_eq!(rx.accepted_samples(), want);
    assert_eq!(
        counter(
            &writer,
            "sonde_remote_write_samples_dropped_total",
            Some("queue_full")
        ),
        50.0
    );
    assert_eq!(
        counter(&writer, "sonde_remote_write_samples_sent_total", None),
        50.0
    );
    assert_eq!(
        counter(&writer, "sonde_remote_write_queue_bytes", None),
        0.0
    );
    writer.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn samples_evicted_while_their_request_succeeds_count_as_sent_only() {
    let rx = Receiver::start().await;
    let mut slow = Reply::status(204);
    slow.delay = Duration::from_millis(500);
    rx.script([slow]);
    let one = crate::storage::queue::labels::sample_bytes(&sample("m", 1).series.to_pairs());
    let mut cfg = config(&rx.url());
    cfg.queue_config.max_samples_per_send = 10;
    cfg.queue_config.max_queue_bytes = ByteSize(50 * one);
    let writer = start(cfg);
    writer.push((1..=10).map(|t| sample("m", t)).collect());
    eventually("the slow request", || rx.attempts() == 1).await;
    // Pushes 1..=10, which are in flight, out of the queue.
    writer.push((11..=60).map(|t| sample("m", t)).collect());
    eventually("everything", || writer.status().sent_samples == 60).await;
    let want: Vec<Flat> = (1..=60).map(|t| flat("m", t)).collect();
    assert_eq!(rx.accepted_samples(), want);
    assert_eq!(
        counter(&writer, "sonde_remote_write_samples_sent_total", None),
        60.0
    );
    assert_eq!(writer.status().dropped_samples, 0);
    writer.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn queue_survives_a_restart_and_delivers_exactly_once_in_order() {
    let dir = temp_dir("restart");
    // Nothing listens here yet: the receiver is down.
    let addr = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let cfg = config(&format!("http://{addr}/api/v1/write"));
    {
        let store = Arc::new(Store::open(&dir).unwrap());
        let writer = RemoteWriter::start(cfg.clone(), &no_labels(), store.clone()).unwrap();
        for t in 1..=100 {
            writer.push(wave(5, t));
        }
        eventually("a failed attempt", || writer.status().failing).await;
        assert_eq!(writer.status().queued_samples, 500);
        // Gone without a shutdown, like a SIGKILL: nothing flushed, nothing sent.
        drop(writer);
    }
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let rx = Receiver::serve(listener, None, Speaks::V1Lenient);
    let store = Arc::new(reopen(&dir).await);
    let writer = RemoteWriter::start(cfg, &no_labels(), store).unwrap();
    assert_eq!(writer.status().queued_samples, 500);
    // The last queued timestamp of each series survived: an older sample is refused.
    writer.push(vec![sample("m0", 50), sample("m0", 101)]);
    eventually("everything", || writer.status().sent_samples == 501).await;
    let got = per_series(&rx);
    assert_eq!(got.len(), 5);
    for (name, ts) in &got {
        let mut want: Vec<i64> = (1..=100).collect();
        if name == "m0" {
            want.push(101);
        }
        assert_eq!(ts, &want, "{name}: exactly once, in order");
    }
    assert_eq!(
        counter(
            &writer,
            "sonde_remote_write_samples_dropped_total",
            Some("out_of_order")
        ),
        1.0
    );
    assert_eq!(writer.status().queued_samples, 0);
    assert_eq!(writer.status().queued_bytes, 0);
    writer.shutdown(Duration::from_secs(1)).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn shutdown_leaves_what_it_could_not_send_for_the_next_start() {
    let dir = temp_dir("shutdown");
    let rx = Receiver::start().await;
    rx.set_fallback(Some(Reply::status(503)));
    let cfg = config(&rx.url());
    {
        let store = Arc::new(Store::open(&dir).unwrap());
        let writer = RemoteWriter::start(cfg.clone(), &no_labels(), store).unwrap();
        writer.push((1..=10).map(|t| sample("a", t)).collect());
        eventually("a failed attempt", || rx.attempts() >= 1).await;
        writer.shutdown(Duration::from_millis(100)).await;
    }
    rx.set_fallback(None);
    let store = Arc::new(reopen(&dir).await);
    let writer = RemoteWriter::start(cfg, &no_labels(), store).unwrap();
    eventually("the rest", || writer.status().sent_samples == 10).await;
    let want: Vec<Flat> = (1..=10).map(|t| flat("a", t)).collect();
    assert_eq!(rx.accepted_samples(), want);
    writer.shutdown(Duration::from_secs(1)).await;
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test]
async fn shards_send_in_parallel_and_keep_each_series_in_order() {
    let rx = Receiver::start().await;
    rx.log.lock().unwrap().delay = Duration::from_millis(20);
    let mut cfg = config(&rx.url());
    cfg.queue_config.max_samples_per_send = 7;
    cfg.queue_config.max_shards = 4;
    cfg.queue_config.batch_send_deadline = PromDuration::from_millis(5);
    let writer = start(cfg);
    for t in 1..=30 {
        writer.push(wave(40, t));
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    eventually("every sample", || writer.status().sent_samples == 1200).await;
    let got = per_series(&rx);
    assert_eq!(got.len(), 40);
    let want: Vec<i64> = (1..=30).collect();
    for (name, ts) in got {
        assert_eq!(ts, want, "{name}");
    }
    let concurrent = rx.log.lock().unwrap().max_in_flight;
    assert!(concurrent > 1, "at most {concurrent} request(s) in flight");
    assert!(
        concurrent <= 4,
        "{concurrent} requests in flight with 4 shards"
    );
    assert_eq!(writer.status().shards, 4);
    writer.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn enqueue_commits_and_rolls_back_with_the_callers_transaction() {
    let rx = Receiver::start().await;
    let store = memory();
    let writer = RemoteWriter::start(config(&rx.url()), &no_labels(), store.clone()).unwrap();
    let failed = store.transaction(|tx| {
        writer.enqueue(tx, &[sample("a", 1), sample("a", 2)])?;
        tx.execute("INSERT INTO nonexistent VALUES (1)", [])?;
        Ok(())
    });
    assert!(failed.is_err());
    writer.wake();
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(rx.attempts(), 0, "a rolled-back sample was sent");
    // The caller replays the batch (the agent was never acked): accepted.
    store
        .transaction(|tx| writer.enqueue(tx, &[sample("a", 1), sample("a", 2)]))
        .unwrap();
    writer.wake();
    eventually("the replayed batch", || writer.status().sent_samples == 2).await;
    assert_eq!(rx.accepted_samples(), vec![flat("a", 1), flat("a", 2)]);
    assert_eq!(writer.status().dropped_samples, 0);
    writer.shutdown(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn samples_older_than_sample_age_limit_are_dropped() {
    let rx = Receiver::start().await;
    let mut cfg = config(&rx.url());
    cfg.queue_config.sample_age_limit = PromDuration::from_secs(3600);
    let writer = start(cfg);
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64;
    writer.push(vec![sample("a", now - 2 * 3_600_000), sample("a", now)]);
    eventually("the recent sample", || writer.status().sent_samples == 1).await;
    assert_eq!(rx.accepted_samples(), vec![flat("a", now)]);
    assert_eq!(
        counter(
            &writer,
            "sonde_remote_write_samples_dropped_total",
            Some("too_old")
        ),
        1.0
    );
    writer.shutdown(Duration::from_secs(1)).await;
}

/// Not a pass/fail bound, a figure for the report: samples queued per second through
/// `enqueue` (one transaction per 100 samples, as a busy hub would commit).
#[test]
fn enqueue_throughput() {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let _guard = runtime.enter();
    let dir = temp_dir("throughput");
    let store = Arc::new(Store::open(&dir).unwrap());
    // Nothing listens: the samples stay queued.
    let writer = RemoteWriter::start(
        config("http://127.0.0.1:9/api/v1/write"),
        &no_labels(),
        store.clone(),
    )
    .unwrap();
    // The hub hands the same series (`Arc`) for every sample of a series.
    let series: Vec<Arc<SeriesLabels>> = (0..100)
        .map(|i| {
            Arc::new(SeriesLabels::from_pairs(&[
                ("__name__", "probe_success"),
                ("job", "web"),
                ("instance", &format!("http://target-{i}.example:8080/")),
                ("agent", "edge-1"),
            ]))
        })
        .collect();
    let started = std::time::Instant::now();
    let mut n = 0;
    for t in 1..=100 {
        let batch: Vec<QSample> = series
            .iter()
            .map(|s| QSample {
                series: s.clone(),
                timestamp_ms: t,
                value: 1.0,
            })
            .collect();
        n += batch.len();
        store.transaction(|tx| writer.enqueue(tx, &batch)).unwrap();
    }
    let took = started.elapsed();
    eprintln!(
        "enqueue: {n} samples in {took:?} = {:.0} samples/s (this build's profile)",
        n as f64 / took.as_secs_f64()
    );
    assert_eq!(writer.status().queued_samples, n);
    drop(writer);
    let _ = std::fs::remove_dir_all(&dir);
}
