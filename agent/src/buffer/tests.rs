use super::disk::{DB_FILES, LOCK_FILE, row_bytes};
use super::*;
use crate::probe::{ProbeOutcome, Sample};
use std::path::PathBuf;

/// `Buffer::open` on a directory this test process used a moment ago. Another test
/// of the process may be forking a child right then, whose copy of the lock file's
/// descriptor holds the `flock` until it execs: wait that out (a real restart is a
/// new process and never sees this).
fn reopen(dir: &Path, addresses: &[String], max_bytes: u64) -> Result<Arc<Buffer>, BufferError> {
    let mut tries = 0;
    loop {
        match Buffer::open(Some(dir), addresses, max_bytes) {
            Err(BufferError::Locked(sonde_cli::storage_lock::LockError::Held { .. }))
                if tries < 50 =>
            {
                tries += 1;
                std::thread::sleep(Duration::from_millis(100));
            }
            other => return other,
        }
    }
}

/// One aggregator's side of a buffer, as its uplink sees it.
struct View<'a> {
    buffer: &'a Buffer,
    slot: usize,
}

impl<'a> View<'a> {
    fn new(buffer: &'a Buffer, slot: usize) -> Self {
        Self { buffer, slot }
    }

    fn pending_after(&self, after: u64, max: usize) -> Vec<Arc<ProbeRecord>> {
        self.buffer.pending_after(self.slot, after, max)
    }

    fn ack(&self, seq: u64) -> usize {
        self.buffer.ack(self.slot, seq)
    }

    fn count_up_to(&self, seq: u64) -> usize {
        self.buffer.count_up_to(self.slot, seq)
    }

    fn stats(&self) -> BufferStats {
        self.buffer.stats(self.slot)
    }
}

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sonde-agent-store-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

fn record(seq: u64, job: &str) -> ProbeRecord {
    ProbeRecord {
        seq,
        job: job.into(),
        instance: "http://target:8080/".into(),
        timestamp_ms: 1_700_000_000_000 + seq as i64,
        success: !seq.is_multiple_of(3),
        duration_seconds: 0.01 * seq as f64,
        samples: vec![
            Sample {
                name: "probe_success",
                labels: vec![],
                value: 1.0,
            },
            Sample {
                name: "probe_http_duration_seconds",
                labels: vec![("phase", "connect".into())],
                value: 0.002,
            },
        ],
        generation: 3,
        failure: seq.is_multiple_of(3).then(|| "connection refused".into()),
        trace: None,
    }
}

fn append(store: &Buffer, route: Route, job: &str) -> u64 {
    store
        .append(&route, |seq| record(seq, job))
        .expect("store open")
}

fn seqs(records: &[Arc<ProbeRecord>]) -> Vec<u64> {
    records.iter().map(|r| r.seq).collect()
}

const A: &str = "http://a:9451";
const B: &str = "http://b:9451";

#[test]
fn probe_counts_survive_a_restart() {
    let dir = temp_dir("counts");
    {
        let store = reopen(&dir, &[A.into()], 1 << 20).unwrap();
        for _ in 0..3 {
            append(&store, Route::All, "web");
        }
        store.flush();
    }
    let store = reopen(&dir, &[A.into()], 1 << 20).unwrap();
    let counts = store.probe_counts();
    assert_eq!(counts.len(), 1, "{counts:?}");
    assert_eq!(counts[0].0.0, "web");
    assert_eq!(counts[0].1.0, 3);
    drop(store);
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn results_survive_a_restart_in_order_and_numbering_continues() {
    let dir = temp_dir("restart");
    let appended: Vec<u64>;
    let next;
    {
        let store = reopen(&dir, &[A.into()], 1 << 20).unwrap();
        let buffer = View::new(&store, 0);
        appended = (0..5).map(|_| append(&store, Route::All, "web")).collect();
        store.flush();
        assert_eq!(buffer.ack(appended[1]), 2);
        next = store.next_seq();
        // Everything dropped without a word, as when the process ends.
    }
    let store = reopen(&dir, &[A.into()], 1 << 20).unwrap();
    let buffer = View::new(&store, 0);
    assert_eq!(buffer.stats().acked_seq, appended[1]);
    assert_eq!(buffer.stats().results, 3);
    let pending = buffer.pending_after(buffer.stats().acked_seq, 100);
    assert_eq!(seqs(&pending), appended[2..]);
    for r in &pending {
        assert_eq!(**r, record(r.seq, "web"), "the full content comes back");
    }
    assert_eq!(
        store.next_seq(),
        next,
        "numbering continues above the old ones"
    );
    let newer = append(&store, Route::All, "web");
    store.flush();
    assert!(newer > appended[4]);
    assert_eq!(
        seqs(&buffer.pending_after(appended[1], 100)),
        [&appended[2..], &[newer]].concat(),
        "replayed results come before new ones"
    );

    // With everything acked the queue is empty, and numbering still continues.
    buffer.ack(newer);
    store.flush();
    drop(store);
    let store = reopen(&dir, &[A.into()], 1 << 20).unwrap();
    assert_eq!(store.disk_rows().unwrap(), 0);
    assert_eq!(store.next_seq(), newer + 1);
    drop(store);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn ack_deletes_only_up_to_the_acked_seq_and_replay_starts_after_it() {
    let dir = temp_dir("ack");
    let store = reopen(&dir, &[A.into()], 1 << 20).unwrap();
    let buffer = View::new(&store, 0);
    let s: Vec<u64> = (0..10).map(|_| append(&store, Route::All, "web")).collect();
    store.flush();
    // The uplink sends everything in two batches; the aggregator acks part of it.
    assert_eq!(seqs(&buffer.pending_after(0, 4)), s[..4]);
    assert_eq!(seqs(&buffer.pending_after(s[3], 100)), s[4..]);
    assert_eq!(buffer.count_up_to(s[9]), 10);
    assert_eq!(buffer.ack(s[5]), 6);
    store.flush();
    assert_eq!(store.disk_rows().unwrap(), 4);
    assert_eq!(buffer.count_up_to(s[9]), 4);
    // After a reconnect the uplink starts again from the last ack.
    let from = buffer.stats().acked_seq;
    assert_eq!(from, s[5]);
    assert_eq!(seqs(&buffer.pending_after(from, 100)), s[6..]);
    // A stale, smaller ack changes nothing.
    assert_eq!(buffer.ack(s[2]), 0);
    assert_eq!(buffer.stats().acked_seq, s[5]);
    drop(store);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_full_buffer_drops_the_oldest_counts_them_and_keeps_the_newest() {
    let dir = temp_dir("full");
    let row = u64::from(row_bytes(&record(1000, "web").encode()));
    let store = reopen(&dir, &[A.into()], row * 3 + row / 2).unwrap();
    let buffer = View::new(&store, 0);
    let mut last = 0;
    for round in 0..20 {
        for _ in 0..500 {
            last = append(&store, Route::All, "web");
        }
        store.flush();
        assert!(
            store.disk_rows().unwrap() <= 3,
            "round {round}: rows on disk stay within the bound"
        );
    }
    let stats = buffer.stats();
    assert_eq!(stats.results, 3);
    assert_eq!(stats.dropped, 10_000 - 3);
    assert!(stats.bytes as u64 <= row * 3 + row / 2);
    assert_eq!(
        seqs(&buffer.pending_after(0, 10)),
        [last - 2, last - 1, last],
        "the newest are kept"
    );
    let size = std::fs::metadata(dir.join(DB_FILE)).unwrap().len();
    assert!(size < 1 << 20, "the file stays small: {size} bytes");

    // Reopened with a smaller limit, the buffer shrinks to it at once, newest kept.
    drop(store);
    let store = reopen(&dir, &[A.into()], 1).unwrap();
    let buffer = View::new(&store, 0);
    assert_eq!(seqs(&buffer.pending_after(0, 10)), [last]);
    assert_eq!(buffer.stats().dropped, 2);
    assert_eq!(store.disk_rows().unwrap(), 1);
    drop(store);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn two_aggregators_each_get_their_results_and_their_own_acks() {
    let dir = temp_dir("two");
    let store = reopen(&dir, &[A.into(), B.into()], 1 << 20).unwrap();
    let (a, b) = (View::new(&store, 0), View::new(&store, 1));
    let local1 = append(&store, Route::All, "local");
    let to_a = append(&store, Route::To(Arc::from([(0, 3)])), "assigned-a");
    let to_b = append(&store, Route::To(Arc::from([(1, 3)])), "assigned-b");
    let local2 = append(&store, Route::All, "local");
    store.flush();
    assert_eq!(seqs(&a.pending_after(0, 10)), [local1, to_a, local2]);
    assert_eq!(seqs(&b.pending_after(0, 10)), [local1, to_b, local2]);
    assert_eq!(a.pending_after(0, 10)[1].job, "assigned-a");

    assert_eq!(a.ack(local2), 3);
    store.flush();
    assert_eq!(a.stats().results, 0);
    assert_eq!(b.stats().results, 3, "A's ack leaves B's results alone");
    assert_eq!(b.stats().acked_seq, 0);
    assert_eq!(store.disk_rows().unwrap(), 3);
    assert_eq!(b.ack(local1), 1);
    store.flush();
    drop(store);

    // Cursors follow the address, not the position in the config; an aggregator
    // that left the config takes its results with it.
    let c = "http://c:9451".to_string();
    let store = reopen(&dir, &[B.into(), A.into()], 1 << 20).unwrap();
    assert_eq!(store.aggregators()[0], B);
    assert_eq!(
        seqs(&View::new(&store, 0).pending_after(0, 10)),
        [to_b, local2]
    );
    assert_eq!(store.stats(0).acked_seq, local1);
    assert_eq!(store.stats(1).acked_seq, local2);
    drop(store);
    let store = reopen(&dir, &[A.into(), c], 1 << 20).unwrap();
    assert_eq!(store.disk_rows().unwrap(), 0);
    drop(store);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_shared_result_is_one_number_with_each_aggregators_generation_after_a_restart() {
    let dir = temp_dir("each");
    let c = "http://c:9451".to_string();
    let aggregators = [A.into(), B.into(), c];
    let shared = {
        let store = reopen(&dir, &aggregators, 1 << 20).unwrap();
        // `record` carries generation 3: A's row keeps it, B and C get theirs.
        let route = Route::To(Arc::from([(0, 3), (1, 8), (2, 8), (9, 1)]));
        let shared = append(&store, route, "shared");
        store.flush();
        let generations: Vec<_> = (0..3)
            .map(|slot| store.pending_after(slot, 0, 10)[0].generation)
            .collect();
        assert_eq!(generations, [3, 8, 8], "from memory");
        assert_eq!(store.disk_rows().unwrap(), 3, "none for index 9");
        shared
    };
    let store = reopen(&dir, &aggregators, 1 << 20).unwrap();
    let read: Vec<_> = (0..3)
        .map(|slot| {
            let r = store.pending_after(slot, 0, 10)[0].clone();
            (r.seq, r.generation, r.timestamp_ms, r.samples.clone())
        })
        .collect();
    let expected = record(shared, "shared");
    for (i, generation) in [3, 8, 8].into_iter().enumerate() {
        assert_eq!(
            read[i],
            (
                shared,
                generation,
                expected.timestamp_ms,
                expected.samples.clone()
            ),
            "from disk, aggregator {i}"
        );
    }
    let counts = store.probe_counts();
    assert_eq!(
        counts[0].1,
        (1, u64::from(!expected.success)),
        "counted once"
    );
    drop(store);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_backlog_beyond_the_cache_is_read_back_from_disk_in_order() {
    let dir = temp_dir("backlog");
    let store = Buffer::open_with_cache(
        Some(&dir),
        &[A.into()],
        1 << 30,
        4 * record(1, "web").approx_bytes(),
    )
    .unwrap();
    let buffer = View::new(&store, 0);
    let all: Vec<u64> = (0..1000)
        .map(|_| append(&store, Route::All, "web"))
        .collect();
    store.flush();
    let mut sent = Vec::new();
    let mut after = 0;
    loop {
        let batch = buffer.pending_after(after, 64);
        let Some(last) = batch.last() else { break };
        after = last.seq;
        for r in &batch {
            assert_eq!(**r, record(r.seq, "web"));
        }
        sent.extend(seqs(&batch));
    }
    assert_eq!(sent, all);
    drop(store);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_result_is_on_disk_before_the_uplink_can_see_it() {
    let dir = temp_dir("visible");
    let store = reopen(&dir, &[A.into()], 1 << 30).unwrap();
    let buffer = View::new(&store, 0);
    let check = Connection::open(dir.join(DB_FILE)).unwrap();
    let mut seen = 0;
    for _ in 0..2000 {
        append(&store, Route::All, "web");
        for r in buffer.pending_after(seen, 1000) {
            let on_disk: i64 = check
                .query_row(
                    "SELECT COUNT(*) FROM queue WHERE seq = ?1",
                    [r.seq as i64],
                    |row| row.get(0),
                )
                .unwrap();
            assert_eq!(on_disk, 1, "result {} was visible before its commit", r.seq);
            seen = r.seq;
        }
    }
    drop(check);
    drop(store);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// A real SIGKILL: a child process (this test binary, running only
/// `crash_child`) appends and reports every result the uplink could have sent; the
/// parent kills it mid-stream and finds every reported result on disk.
#[test]
fn results_the_uplink_saw_survive_a_sigkill() {
    use std::io::{BufRead, BufReader};
    let dir = temp_dir("sigkill");
    std::fs::create_dir_all(&dir).unwrap();
    let mut child = std::process::Command::new(std::env::current_exe().unwrap())
        .args([
            "buffer::tests::crash_child",
            "--exact",
            "--nocapture",
            "--test-threads=1",
        ])
        .env("SONDE_STORE_CRASH_DIR", &dir)
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut seen = Vec::new();
    let lines = BufReader::new(child.stdout.take().unwrap()).lines();
    for line in lines {
        let line = line.unwrap();
        if let Some(seq) = line.strip_prefix("sent ") {
            seen.push(seq.parse::<u64>().unwrap());
            if seen.len() >= 3000 {
                break;
            }
        }
    }
    child.kill().unwrap();
    child.wait().unwrap();
    assert!(
        seen.len() >= 3000,
        "the child reported {} results",
        seen.len()
    );

    let store = reopen(&dir, &[A.into()], 1 << 30).unwrap();
    let buffer = View::new(&store, 0);
    let mut on_disk = Vec::new();
    let mut after = 0;
    loop {
        let batch = buffer.pending_after(after, 10_000);
        let Some(last) = batch.last() else { break };
        after = last.seq;
        on_disk.extend(seqs(&batch));
    }
    for seq in &seen {
        assert!(on_disk.binary_search(seq).is_ok(), "result {seq} was lost");
    }
    assert!(store.next_seq() > *seen.last().unwrap());
    drop(store);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Only does something when started by `results_the_uplink_saw_survive_a_sigkill`.
#[test]
fn crash_child() {
    use std::io::Write;
    let Some(dir) = std::env::var_os("SONDE_STORE_CRASH_DIR") else {
        return;
    };
    let store = Buffer::open(Some(Path::new(&dir)), &[A.into()], 1 << 30).unwrap();
    let buffer = View::new(&store, 0);
    let mut out = std::io::stdout().lock();
    let mut sent = 0;
    loop {
        for _ in 0..20 {
            append(&store, Route::All, "web");
        }
        for r in buffer.pending_after(sent, 1000) {
            writeln!(out, "sent {}", r.seq).unwrap();
            sent = r.seq;
        }
        out.flush().unwrap();
    }
}

#[cfg(unix)]
fn mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path).unwrap().permissions().mode() & 0o777
}

#[cfg(unix)]
#[test]
fn the_database_files_are_private() {
    let dir = temp_dir("private");
    let store = reopen(&dir, &[A.into()], 1 << 20).unwrap();
    append(&store, Route::All, "web");
    store.flush();
    for name in DB_FILES.iter().chain([&LOCK_FILE]) {
        assert_eq!(mode(&dir.join(name)), 0o600, "{name}");
    }
    store.close();
    drop(store);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[cfg(unix)]
#[test]
fn wider_database_files_are_narrowed_to_0600() {
    use std::os::unix::fs::PermissionsExt;
    let dir = temp_dir("narrowed");
    let store = reopen(&dir, &[A.into()], 1 << 20).unwrap();
    append(&store, Route::All, "web");
    store.flush();
    // As an older agent (or a umask of 0) left them, the -wal and -shm still there.
    for name in DB_FILES {
        std::fs::set_permissions(dir.join(name), std::fs::Permissions::from_mode(0o644)).unwrap();
    }
    drop(store);
    let store = reopen(&dir, &[A.into()], 1 << 20).unwrap();
    append(&store, Route::All, "web");
    store.flush();
    for name in DB_FILES {
        assert_eq!(mode(&dir.join(name)), 0o600, "{name}");
    }
    assert_eq!(View::new(&store, 0).stats().results, 2);
    drop(store);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_closed_buffer_is_not_healthy() {
    let store = Buffer::open(None, &[A.into()], 1 << 20).unwrap();
    assert!(store.health().is_ok());
    store.close();
    assert!(store.health().unwrap_err().to_string().contains("closed"));
}

#[test]
fn a_second_agent_on_the_same_path_is_refused() {
    let dir = temp_dir("locked");
    let store = reopen(&dir, &[A.into()], 1 << 20).unwrap();
    let err = reopen(&dir, &[A.into()], 1 << 20)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains(&dir.display().to_string()), "{err}");
    assert!(
        err.contains(&format!("(PID {})", std::process::id())),
        "{err}"
    );
    drop(store);
    // Released when the first one closes.
    drop(reopen(&dir, &[A.into()], 1 << 20).unwrap());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn an_unusable_path_is_named_in_the_error() {
    let file = temp_dir("not-a-dir");
    std::fs::write(&file, "").unwrap();
    let err = Buffer::open(Some(&file), &[A.into()], 1 << 20)
        .err()
        .unwrap()
        .to_string();
    assert!(
        err.starts_with(&format!("cannot open {}", file.display())),
        "{err}"
    );
    assert!(err.ends_with("check --storage.path"), "{err}");
    std::fs::remove_file(&file).unwrap();

    let err = Buffer::open(None, &[A.into(), A.into()], 1 << 20)
        .err()
        .unwrap()
        .to_string();
    assert!(err.contains("listed twice"), "{err}");
}

#[tokio::test]
async fn committed_wakes_once_a_result_is_committed() {
    let store = Buffer::open(None, &[A.into()], 1 << 20).unwrap();
    let woken = store.committed(0);
    let seq = append(&store, Route::All, "web");
    tokio::time::timeout(Duration::from_secs(5), woken)
        .await
        .expect("woken");
    assert_eq!(seqs(&store.pending_after(0, 0, 10)), [seq]);
}

#[test]
fn a_batch_of_results_is_one_commit() {
    // Results that arrive within the writer's linger become visible together.
    let store = Buffer::open(None, &[A.into()], 1 << 20).unwrap();
    let first = append(&store, Route::All, "web");
    let more: Vec<u64> = (0..99).map(|_| append(&store, Route::All, "web")).collect();
    let mut seen = store.pending_after(0, 0, 1000).len();
    assert!(seen == 0 || seen == 100, "{seen} of 100 visible");
    let start = std::time::Instant::now();
    while seen == 0 && start.elapsed() < Duration::from_secs(5) {
        std::thread::sleep(Duration::from_millis(5));
        seen = store.pending_after(0, 0, 1000).len();
    }
    assert_eq!(seen, 100, "all of them at once");
    assert_eq!(seqs(&store.pending_after(0, first, 1000)), more);
}

fn outcome() -> ProbeOutcome {
    ProbeOutcome {
        success: true,
        duration: Duration::from_millis(100),
        samples: vec![Sample {
            name: "probe_http_status_code",
            labels: Vec::new(),
            value: 200.0,
        }],
        failure: None,
        failure_reason: None,
        trace: None,
        log: Default::default(),
    }
}

#[test]
fn each_result_goes_to_the_aggregators_of_its_route() {
    let dir = temp_dir("route");
    let c = "http://c:9451".to_string();
    let store = reopen(&dir, &[A.into(), B.into(), c], 1 << 20).unwrap();
    let to = |slots: &[(usize, u64)]| Route::To(Arc::from(slots));
    assert_eq!(store.record(&to(&[]), "nobody", "t:1", 1, outcome()), None);
    store.record(&Route::All, "local", "t:1", 1, outcome());
    store.record(&to(&[(1, 4)]), "assigned", "t:1", 2, outcome());
    // One check two aggregators assigned, each under its own generation.
    store.record(&to(&[(0, 3), (2, 9)]), "shared", "t:1", 3, outcome());
    // An index from another config is left out, the rest still get it.
    store.record(&to(&[(1, 4), (7, 1)]), "shared", "t:2", 4, outcome());
    store.flush();
    let got = |i: usize| {
        store
            .pending_after(i, 0, 10)
            .iter()
            .map(|r| (r.seq, r.job.clone(), r.timestamp_ms, r.generation))
            .collect::<Vec<_>>()
    };
    let (a, b, c) = (got(0), got(1), got(2));
    let jobs = |v: &[(u64, String, i64, u64)]| {
        v.iter()
            .map(|r| (r.1.clone(), r.3))
            .collect::<Vec<(String, u64)>>()
    };
    let owned = |v: &[(&str, u64)]| {
        v.iter()
            .map(|(j, g)| (j.to_string(), *g))
            .collect::<Vec<_>>()
    };
    assert_eq!(jobs(&a), owned(&[("local", 0), ("shared", 3)]));
    assert_eq!(
        jobs(&b),
        owned(&[("local", 0), ("assigned", 4), ("shared", 4)])
    );
    assert_eq!(jobs(&c), owned(&[("local", 0), ("shared", 9)]));
    // The shared result is one result: same number and timestamp for both.
    assert_eq!((a[1].0, a[1].2), (c[1].0, c[1].2));
    assert_eq!(a[0].0, b[0].0);
    let samples = |i: usize| store.pending_after(i, 0, 10)[1].samples.clone();
    assert_eq!(samples(0), samples(2));
    // Counted once per run, whoever it went to.
    let total: u64 = store.probe_counts().iter().map(|(_, (t, _))| t).sum();
    assert_eq!(total, 4);
    drop(store);
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn no_aggregator_nothing_kept() {
    let alone = Buffer::open(None, &[], 1 << 20).unwrap();
    assert_eq!(alone.record(&Route::All, "j", "i", 1, outcome()), None);
}
