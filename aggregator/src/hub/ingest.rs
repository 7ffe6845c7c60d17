//! The threads that run the hub: the ingest thread applies commands to the [`State`] and
//! hands each group's changes to the storage thread, which commits them; the discovery
//! thread collects the discovered targets. See the module above for the design.

use super::*;
use std::collections::HashMap;
use std::sync::atomic::Ordering::Relaxed;

pub(super) fn storage_thread(
    output: Arc<dyn Output>,
    jobs: std_mpsc::Receiver<(Samples, Durable)>,
    committed: std_mpsc::Sender<Result<(), StoreError>>,
) {
    while let Ok((samples, durable)) = jobs.recv() {
        let result = if samples.is_empty() && durable.is_empty() {
            Ok(())
        } else {
            output.commit(&samples, &durable)
        };
        // Dropping the samples here, off the ingest thread, frees their series too.
        drop(samples);
        if committed.send(result).is_err() {
            return;
        }
    }
}

pub(super) fn discovery_thread(
    shared: Arc<Shared>,
    commands: std_mpsc::Sender<Command>,
    stop: std_mpsc::Receiver<()>,
) {
    let mut last: Option<(Arc<AggregatorConfig>, TargetSet)> = None;
    while let Err(std_mpsc::RecvTimeoutError::Timeout) = stop.recv_timeout(DISCOVERY_EVERY) {
        let config = shared
            .config
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        if !crate::targets::Discovery::is_dynamic(&config.jobs) {
            continue;
        }
        let targets = shared.discover(&config);
        let unchanged = last
            .as_ref()
            .is_some_and(|(c, t)| Arc::ptr_eq(c, &config) && *t == targets);
        if unchanged {
            continue;
        }
        last = Some((config.clone(), targets.clone()));
        if commands.send(Command::Targets { config, targets }).is_err() {
            return;
        }
    }
}

/// What a group owes once its commit is done.
enum Owed {
    Ack(
        oneshot::Sender<Result<Option<u64>, ResultsError>>,
        Option<u64>,
    ),
    Done(oneshot::Sender<()>),
    Snapshot(oneshot::Sender<Arc<Snapshot>>),
}

/// The streams of the connected agents, by connection: where the ingest thread sends
/// what the state queues ([`Outgoing`]), right after the command that queued it.
#[derive(Default)]
struct Streams(HashMap<u64, Stream>);

struct Stream {
    /// `None` once the stream could not take an assignment: nothing more is sent on it.
    sender: Option<AgentSender>,
    kick: Arc<Kick>,
}

impl Streams {
    /// Sends or ends what `outgoing` says; tells the state of streams that could not take
    /// their assignment.
    fn carry_out(&mut self, state: &mut State, outgoing: Vec<Outgoing>) {
        for o in outgoing {
            match o {
                Outgoing::Assignment {
                    agent,
                    connection,
                    parts,
                } => {
                    let Some(stream) = self.0.get_mut(&connection) else {
                        continue;
                    };
                    let Some(sender) = &stream.sender else {
                        continue;
                    };
                    if !parts.into_iter().all(|p| sender.try_send(Ok(p)).is_ok()) {
                        // Gone or hopelessly behind: drop it; the agent reconnects and
                        // gets a fresh assignment with its hello.
                        stream.sender = None;
                        state.stream_lost(&agent, connection);
                    }
                }
                Outgoing::End {
                    connection, reason, ..
                } => {
                    if let Some(stream) = self.0.remove(&connection) {
                        stream.kick.kick(reason);
                    }
                }
            }
        }
    }
}

/// Commands applied to the state since the last hand-over to the storage thread.
#[derive(Default)]
struct Group {
    changes: state::Changes,
    owed: Vec<Owed>,
    /// Commands applied into it.
    commands: usize,
}

impl Group {
    fn is_empty(&self) -> bool {
        self.changes.out.is_empty() && self.changes.durable.is_empty() && self.owed.is_empty()
    }

    /// Whether it takes no more commands before it is handed over.
    fn is_full(&self) -> bool {
        self.commands >= MAX_GROUP_COMMANDS || self.changes.out.len() >= MAX_GROUP_SAMPLES
    }
}

/// Applies one command to the state, noting in `group` what it produced and owes, and
/// carries out at once what it sends or ends on the agents' streams.
fn apply(
    state: &mut State,
    applied: &mut Arc<AggregatorConfig>,
    command: Command,
    group: &mut Group,
    streams: &mut Streams,
    shared: &Shared,
) {
    let ch = &mut group.changes;
    match command {
        Command::Results {
            agent,
            batch,
            now_ms,
            reply,
        } => {
            let ack = state.results(
                &agent,
                &batch,
                now_ms,
                ch,
                &shared.counters,
                &shared.refusals,
            );
            group.owed.push(Owed::Ack(reply, ack));
        }
        Command::Connect {
            hello,
            labels,
            credential,
            sender,
            now_ms,
            reply,
        } => {
            shared.counters.agent_connects.fetch_add(1, Relaxed);
            let connected =
                state
                    .connect(&hello, labels, credential, now_ms, ch)
                    .map(|connection| {
                        let kick = Arc::new(Kick::default());
                        streams.0.insert(
                            connection,
                            Stream {
                                sender: Some(sender),
                                kick: kick.clone(),
                            },
                        );
                        Connected { connection, kick }
                    });
            // Its assignment goes out before the stream starts.
            streams.carry_out(state, std::mem::take(&mut ch.outgoing));
            // The stream may start at once: what it sends next is applied after this.
            let _ = reply.send(connected);
        }
        Command::Disconnect {
            agent,
            connection,
            now_ms,
        } => {
            streams.0.remove(&connection);
            state.disconnect(&agent, connection, now_ms);
        }
        Command::DisconnectAll { now_ms, reply } => {
            streams.0.clear();
            state.disconnect_all(now_ms);
            let _ = reply.send(());
        }
        Command::Heartbeat {
            agent,
            agent_time_ms,
            now_ms,
        } => state.heartbeat(&agent, agent_time_ms, now_ms),
        Command::AssignmentReport { agent, report } => state.assignment_report(&agent, &report),
        Command::Tick { now_ms, reply } => {
            let before = ch.durable.forgotten.len();
            state.tick(now_ms, ch);
            for id in &ch.durable.forgotten[before..] {
                shared.refusals.forget(id);
            }
            group.owed.push(Owed::Done(reply));
        }
        Command::Reload {
            config,
            targets,
            now_ms,
            reply,
        } => {
            state.reload(Arc::new(config.hub()), targets, now_ms, ch);
            *applied = config;
            group.owed.push(Owed::Done(reply));
        }
        Command::Maintenance {
            windows,
            now_ms,
            reply,
        } => {
            state.set_maintenance(windows, now_ms, ch);
            group.owed.push(Owed::Done(reply));
        }
        Command::Restore {
            agents,
            jobs,
            reply,
        } => {
            state.restore(agents, jobs);
            let _ = reply.send(());
        }
        // Targets discovered under a config a reload has replaced meanwhile are dropped.
        Command::Targets { config, targets } => {
            if Arc::ptr_eq(&config, applied) {
                state.discovered(targets, ch);
            }
        }
        Command::Snapshot { .. } | Command::Stop => {}
    }
    streams.carry_out(state, std::mem::take(&mut group.changes.outgoing));
}

/// How many commands one group takes at most, so that a flood of batches still
/// commits (and acks) in bounded steps.
const MAX_GROUP_COMMANDS: usize = 512;
const MAX_GROUP_SAMPLES: usize = 200_000;

/// The least time from one hand-over to the storage thread to the next. A commit costs
/// about the same for one batch as for fifty (SQLite's statements and the pages it
/// writes to the WAL are per transaction, not per row), so at a real fleet's shape,
/// where each batch carries about one result, a group gathered over this window carries
/// tens of batches for the price of one commit. It adds at most this much to an ack and
/// to a failure's way to the receiver. Under a heavier load a commit takes longer than
/// this and the window has passed when it ends: nothing waits; after a quiet spell
/// longer than the window, the first batch goes at once.
const GATHER_WINDOW: Duration = Duration::from_millis(20);

pub(super) fn ingest_thread(
    mut state: State,
    mut applied: Arc<AggregatorConfig>,
    commands: std_mpsc::Receiver<Command>,
    storage: std_mpsc::SyncSender<(Samples, Durable)>,
    committed: std_mpsc::Receiver<Result<(), StoreError>>,
    shared: Arc<Shared>,
) {
    let mut current = Group::default();
    let mut streams = Streams::default();
    let mut in_flight: Option<(Group, Option<Arc<Snapshot>>)> = None;
    let mut waiting: Vec<oneshot::Sender<Arc<Snapshot>>> = Vec::new();
    let mut handed_over = Instant::now()
        .checked_sub(GATHER_WINDOW)
        .unwrap_or_else(Instant::now);
    loop {
        let mut next = None;
        if in_flight.is_none() && current.is_empty() && waiting.is_empty() {
            // Idle: parked on the channel until the next command.
            let Ok(first) = commands.recv() else { return };
            next = Some(first);
        }
        // Everything queued, up to the group's bound. Between hand-overs the thread
        // waits on the commit or on a timer, never on the channel, so a stream's send
        // finds no parked receiver to wake: the commands of a window cost one wake-up.
        while !current.is_full() {
            let Some(command) = next.take().or_else(|| commands.try_recv().ok()) else {
                break;
            };
            match command {
                Command::Stop => return,
                Command::Snapshot { reply } => waiting.push(reply),
                command => {
                    current.commands += 1;
                    apply(
                        &mut state,
                        &mut applied,
                        command,
                        &mut current,
                        &mut streams,
                        &shared,
                    )
                }
            }
        }
        let now = Instant::now();
        let window_closes = handed_over + GATHER_WINDOW;
        if in_flight.is_some() {
            // Wait for the commit; while it runs longer than the window, wake once a
            // window to apply what came meanwhile, so the next group is ready when it
            // ends. A full group waits for the commit alone.
            let result = if current.is_full() {
                committed
                    .recv()
                    .map_err(|_| std_mpsc::RecvTimeoutError::Disconnected)
            } else {
                let wait = window_closes
                    .checked_duration_since(now)
                    .filter(|w| !w.is_zero())
                    .unwrap_or(GATHER_WINDOW);
                committed.recv_timeout(wait)
            };
            let result = match result {
                Ok(result) => result,
                Err(std_mpsc::RecvTimeoutError::Timeout) => continue,
                Err(std_mpsc::RecvTimeoutError::Disconnected) => return,
            };
            let (mut done, snapshot) = in_flight.take().expect("a group is in flight");
            match result {
                Ok(()) => {
                    shared.storage.succeeded();
                    shared.counters.commits.fetch_add(1, Relaxed);
                    shared
                        .counters
                        .committed_commands
                        .fetch_add(done.owed.len() as u64, Relaxed);
                    pay(done.owed, snapshot, None);
                }
                Err(e) => {
                    let e = Arc::new(e);
                    shared.storage.failed(&e);
                    tracing::error!(error = %e, "cannot commit to the store; nothing of it is acked, and it is written again once the store recovers");
                    // Newest first: the group applied after the failed one saw its
                    // changes.
                    let mut later = std::mem::take(&mut current);
                    state.rollback(std::mem::take(&mut later.changes.undo));
                    state.rollback(std::mem::take(&mut done.changes.undo));
                    let fresh = Arc::new(Snapshot::of(&state, applied.clone()));
                    pay(later.owed, Some(fresh.clone()), Some(&e));
                    pay(done.owed, Some(fresh), Some(&e));
                }
            }
            // What came during the commit is applied before the next hand-over.
            continue;
        }
        if current.is_empty() {
            // Nothing uncommitted: the state is what the store holds.
            if !waiting.is_empty() {
                let s = Arc::new(Snapshot::of(&state, applied.clone()));
                for w in waiting.drain(..) {
                    let _ = w.send(s.clone());
                }
            }
            continue;
        }
        if !current.is_full() && now < window_closes {
            // Asleep, not parked on the channel: what comes meanwhile is taken in one go.
            std::thread::sleep(window_closes - now);
            continue;
        }
        let snapshot =
            (!waiting.is_empty()).then(|| Arc::new(Snapshot::of(&state, applied.clone())));
        for w in waiting.drain(..) {
            current.owed.push(Owed::Snapshot(w));
        }
        let mut group = std::mem::take(&mut current);
        let out = std::mem::take(&mut group.changes.out);
        let durable = std::mem::take(&mut group.changes.durable);
        if storage.send((out, durable)).is_err() {
            return;
        }
        in_flight = Some((group, snapshot));
        handed_over = Instant::now();
    }
}

/// Answers what a group owes: acks (or the error), completions, snapshots.
fn pay(owed: Vec<Owed>, snapshot: Option<Arc<Snapshot>>, error: Option<&Arc<StoreError>>) {
    for o in owed {
        match o {
            Owed::Ack(tx, ack) => {
                let _ = tx.send(match error {
                    None => Ok(ack),
                    Some(e) => Err(ResultsError::Storage(e.clone())),
                });
            }
            Owed::Done(tx) => {
                let _ = tx.send(());
            }
            Owed::Snapshot(tx) => {
                if let Some(s) = &snapshot {
                    let _ = tx.send(s.clone());
                }
            }
        }
    }
}
