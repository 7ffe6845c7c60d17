//! How the ingest thread groups commands into commits.

use super::*;
use std::sync::Mutex;
use std::sync::mpsc as std_mpsc;

/// An output whose first commit of samples waits until the test opens the gate, and
/// which notes the agent's committed sequence number in each commit of results.
struct GatedOutput {
    entered: Mutex<Option<std_mpsc::Sender<()>>>,
    gate: Mutex<Option<std_mpsc::Receiver<()>>>,
    committed_seqs: Mutex<Vec<u64>>,
}

impl Output for GatedOutput {
    fn commit(
        &self,
        samples: &Samples,
        durable: &Durable,
    ) -> Result<(), crate::storage::StoreError> {
        if samples.is_empty() {
            // The agent's hello.
            return Ok(());
        }
        if let Some(entered) = self.entered.lock().unwrap().take() {
            let _ = entered.send(());
        }
        if let Some(gate) = self.gate.lock().unwrap().take() {
            let _ = gate.recv();
        }
        if let Some(agent) = durable.agents.get("eu-1") {
            self.committed_seqs
                .lock()
                .unwrap()
                .push(agent.committed_seq);
        }
        Ok(())
    }
}

#[test]
fn batches_queued_behind_a_slow_commit_are_committed_in_bounded_groups() {
    let (entered_tx, entered) = std_mpsc::channel();
    let (open, gate) = std_mpsc::channel();
    let output = Arc::new(GatedOutput {
        entered: Mutex::new(Some(entered_tx)),
        gate: Mutex::new(Some(gate)),
        committed_seqs: Mutex::default(),
    });
    let hub = Hub::new(config(CONFIG), output.clone(), T0);
    let (tx, _rx) = mpsc::channel(16);
    connect(&hub, &hello("eu-1", "eu"), None, tx, T0);
    let batch = |seq: u64| -> Arc<[IncomingResult]> {
        let ts = T0 + seq as i64 * 10_000;
        vec![result(seq, "web", "127.0.0.1:80", ts, true)].into()
    };
    let first = hub.results("eu-1", batch(1), T0 + 10_000);
    entered.recv().unwrap();
    // One batch per command, far more than one group takes, all queued while the
    // first commit is held.
    const BATCHES: u64 = 1_200;
    let replies: Vec<_> = (2..=BATCHES + 1)
        .map(|seq| hub.results("eu-1", batch(seq), T0 + seq as i64 * 10_000))
        .collect();
    open.send(()).unwrap();
    assert_eq!(first.wait().ok(), Some(Some(1)));
    for (seq, reply) in (2..).zip(replies) {
        assert_eq!(reply.wait().ok(), Some(Some(seq)), "every batch acked once");
    }
    let seqs = output.committed_seqs.lock().unwrap().clone();
    assert_eq!(seqs.first(), Some(&1), "the first batch is committed alone");
    assert_eq!(seqs.last(), Some(&(BATCHES + 1)));
    let per_commit: Vec<u64> = seqs.windows(2).map(|w| w[1] - w[0]).collect();
    assert!(
        per_commit.iter().all(|n| (1..=512).contains(n)),
        "each commit carries at most a group's bound of batches: {per_commit:?}"
    );
    assert!(
        per_commit.len() < BATCHES as usize / 10,
        "the queued batches share commits: {per_commit:?}"
    );
}
