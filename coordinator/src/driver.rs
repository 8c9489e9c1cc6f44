//! The one task that owns a replica's core and its acceptor log.
//!
//! gRPC handlers send [`Command`]s here with a oneshot for the reply. The loop takes every
//! command already queued, feeds them to the core, then drains the outputs in the order the
//! core's contract demands: all records of the batch go to the log in one append and one
//! fsync (group commit), and only then do messages leave and clients hear of decisions.
//! Commands that arrive during the fsync form the next batch.
//!
//! One more wait for a fuller batch: the participants of a transaction vote at about the same
//! time, and its decision needs every one of their votes. When the next batch holds a ballot-0
//! Prepared acceptance whose transaction still has votes to come, its fsync waits (at most
//! [`VOTE_HOLD`]) for them, so that one fsync covers the whole transaction instead of the
//! later votes queueing behind the first one's fsync. Nothing is released earlier for it: it
//! only delays the start of a write.
//!
//! The driver also watches its own disk: a write that has not returned within
//! `fsync_stall` marks the replica degraded ([`Lifecycle`]) until it returns. And it drains:
//! once asked to stop, it is no longer an acceptor for other leaders' transactions and tells
//! the shell when nothing it leads is still deciding.

use crate::lifecycle::Lifecycle;
use crate::log::{DurableLog, LogError};
use crate::outcomes::{Archive, Index};
use crate::peers::Peers;
use crate::traces::Traces;
use paxos_commit_core::{
    AbortCause, Dest, JoinAnswer, JoinMode, LocalStatus, Msg, Outcome, Output, Participant, Record,
    Replica, ReplicaId, Stats, TxnError, TxnId, Vote,
};
use paxos_commit_proto::telemetry::TraceParent;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};

/// A decision, why, and how far it got: whether every participant confirmed applying it,
/// and which had not when the answer was given.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub outcome: Outcome,
    /// Why it aborted, when this replica decided so.
    pub cause: Option<AbortCause>,
    pub all_applied: bool,
    pub not_applied: Vec<String>,
}

impl Decision {
    /// The decision as `status` shows it.
    pub fn from_status(
        outcome: Outcome,
        cause: Option<AbortCause>,
        status: &LocalStatus,
    ) -> Decision {
        let not_applied = if status.finished {
            Vec::new()
        } else {
            status
                .participants
                .iter()
                .filter(|p| !status.applied.contains(&p.id))
                .map(|p| p.id.clone())
                .collect()
        };
        Decision {
            outcome,
            cause,
            all_applied: not_applied.is_empty()
                && (status.finished || !status.participants.is_empty()),
            not_applied,
        }
    }
}

/// When a waiting client is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    Decided,
    Applied,
}

pub type DecisionReply = oneshot::Sender<Result<Decision, TxnError>>;

pub enum Command {
    /// Answers the transaction and the Unix time (ms) its open deadline passes, or `None`
    /// when this replica already holds `max_open_transactions` open ones.
    Begin {
        timeout_ms: u64,
        reply: oneshot::Sender<Option<(TxnId, u64)>>,
        /// The trace of the client's call, for what is sent about the transaction.
        trace: Option<TraceParent>,
    },
    /// An agent joins `txn`; the answer goes back to it as an `Enlisted` message.
    Enlist {
        txn: TxnId,
        participant: Participant,
    },
    Commit {
        txn: TxnId,
        until: Until,
        reply: DecisionReply,
        trace: Option<TraceParent>,
    },
    Abort {
        txn: TxnId,
        until: Until,
        reply: DecisionReply,
        trace: Option<TraceParent>,
    },
    Resolve {
        txn: TxnId,
        participant: Option<String>,
        participants: Vec<Participant>,
        reply: DecisionReply,
    },
    /// Paxos messages from peers, each with the trace context it carried; `replica` names
    /// the sending replica and its incarnation when a replica sent them (not an agent).
    Deliver {
        replica: Option<(ReplicaId, u64)>,
        msgs: Vec<(ReplicaId, Msg, Option<TraceParent>)>,
    },
    /// Peer `from` asks to be admitted as `incarnation`; answered once its fence is durable.
    Join {
        from: ReplicaId,
        incarnation: u64,
        mode: JoinMode,
        /// With this replica's own incarnation (0 for none).
        reply: oneshot::Sender<(JoinAnswer, u64)>,
    },
    /// Whether a replica's stream (or call) from `incarnation` is heard: answered with the
    /// incarnation admitted here when it is not.
    Hears {
        from: ReplicaId,
        incarnation: u64,
        reply: oneshot::Sender<Result<(), u64>>,
    },
    /// Peer `from` admitted this replica and lives as `incarnation`.
    JoinAnswered {
        from: ReplicaId,
        incarnation: u64,
    },
    /// Whether every peer has now admitted this replica (the core decides); answered once
    /// that is durable.
    TryAdmit {
        reply: oneshot::Sender<bool>,
    },
    Applied {
        txn: TxnId,
        participant: String,
    },
    Status {
        txn: TxnId,
        reply: oneshot::Sender<(LocalStatus, Option<AbortCause>)>,
    },
    Info {
        reply: oneshot::Sender<Info>,
    },
    /// The audit: each transaction's decided outcome, if this replica knows one.
    Outcomes {
        txns: Vec<TxnId>,
        reply: oneshot::Sender<Vec<Option<Outcome>>>,
    },
    /// The audit: decided-Committed transactions held in full, after a txid.
    Committed {
        after: Option<TxnId>,
        limit: usize,
        reply: oneshot::Sender<Vec<(TxnId, Vec<Participant>, u64)>>,
    },
    /// Stop being an acceptor for other leaders; answer once nothing led here is deciding.
    Drain {
        reply: oneshot::Sender<()>,
    },
}

/// A snapshot for `ClusterInfo`.
#[derive(Debug, Clone)]
pub struct Info {
    pub stats: Stats,
    pub log_bytes: u64,
    pub now_ms: u64,
    pub counters: Counters,
    pub sent: std::collections::BTreeMap<&'static str, u64>,
}

struct Waiter {
    until: Until,
    reply: DecisionReply,
    /// When the caller began to wait, then when the decision came: the decide and apply
    /// phases' latencies.
    since: Instant,
    decided_at: Option<Instant>,
}

/// Counters of what the replica did, for the protocol-cost figures and txctl.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counters {
    /// Batches dropped as sent by an incarnation of a peer that is not the admitted one.
    pub not_heard: u64,
    pub fsyncs: u64,
    pub records: u64,
    pub batches: u64,
}

/// A batch on its way to disk: the log is lent to a blocking task and comes back with the
/// result.
type InFlight = tokio::task::JoinHandle<(Storage, Result<Written, LogError>)>;

/// What the blocking task owns while it writes: the acceptor log, and the archive of
/// decided outcomes (see [`crate::outcomes`]) that rides along with it.
pub struct Storage {
    pub log: DurableLog<Record>,
    pub archive: Archive,
}

/// Something that may only happen once the records produced before it are durable.
enum Held {
    Out(Output),
    /// An answer computed from the core's state, which may include records still on their
    /// way to disk (a decision implied by an acceptance not yet synced must not leak).
    Reply(Box<dyn FnOnce() + Send>),
}

/// What a finished log job did.
struct Written {
    records: usize,
    accepts: bool,
    compacted_from: Option<u64>,
    /// The archive moved to a new day: the index drops what is past its retention.
    new_day: bool,
}

pub struct Driver {
    core: Replica,
    /// Transactions begun here that may still be open (some may have moved on since: they
    /// are swept out when the count reaches `max_open`).
    open: HashSet<TxnId>,
    max_open: usize,
    /// `None` while a batch is being written.
    log: Option<Storage>,
    /// Outcomes archived for days (see [`crate::outcomes`]), for GetStatus once the core
    /// has forgotten a transaction.
    outcomes: Index,
    log_path: std::path::PathBuf,
    log_bytes: u64,
    /// The batch being written, and the outputs that wait for it.
    in_flight: Option<InFlight>,
    held: Vec<Held>,
    /// The next batch: records (and whether any must be durable) and the outputs behind them.
    next_records: Vec<Record>,
    next_sync: bool,
    next_outputs: Vec<Held>,
    peers: Peers,
    epoch: Instant,
    waiters: HashMap<TxnId, Vec<Waiter>>,
    /// Decisions seen for transactions that still have clients waiting for `Applied`.
    decided: HashMap<TxnId, Decision>,
    rx: mpsc::UnboundedReceiver<Command>,
    counters: Counters,
    votes: HashMap<TxnId, VoteTally>,
    /// Records the last compaction kept.
    live_at_rewrite: u64,
    life: Arc<Lifecycle>,
    /// When the write in flight started, and whether it has already been reported stalled.
    in_flight_since: Option<Instant>,
    /// When the first acceptance of the next batch, and of the batch being written, was
    /// made: how long an acceptor's answer waits to be durable (the accept phase).
    next_accept_since: Option<Instant>,
    in_flight_accept_since: Option<Instant>,
    stalled: bool,
    fsync_stall: Duration,
    /// Waiting for the drain to finish.
    drained: Vec<oneshot::Sender<()>>,
    /// After a pause of this process: timers wait until then (see `run`).
    timers_after: Option<Instant>,
    /// Trace contexts and open spans of transactions, when this process exports traces.
    traces: Traces,
    /// When each peer's unheard incarnation was last reported.
    not_heard_said: HashMap<ReplicaId, Instant>,
}

/// How late a wake-up must be to mean that this process was paused.
const RESUMED_LATE: Duration = Duration::from_millis(500);

/// How long a resumed replica reads what queued up before its timers act.
const RESUME_GRACE: Duration = Duration::from_millis(200);

/// Compact the log once this many records were appended since the last rewrite, and at least
/// twice as many as that rewrite kept: a rewrite costs as much as the live state it writes,
/// and under heavy load the retention window alone can hold more than this many records, so
/// a fixed threshold would rewrite the same live records over and over.
const COMPACT_AFTER: u64 = 200_000;

/// Longest an fsync waits for the rest of a transaction's votes (see the module docs). The
/// decision needs those votes anyway, so the wait costs nothing unless one comes later than
/// this; then it costs at most this plus one fsync. A vote that arrives ends the wait at
/// once; only the timeout goes through tokio's timer, whose millisecond ticks can stretch it
/// to just under 2 ms.
const VOTE_HOLD: Duration = Duration::from_millis(1);

/// How long a transaction's vote tally is kept after its acceptances went to disk, so that a
/// late vote does not start a new wait.
const VOTE_TALLY_KEEP: Duration = Duration::from_secs(10);

/// Ballot-0 acceptances of one transaction seen by this replica's acceptor.
struct VoteTally {
    seen: usize,
    /// |R|, or 0 once nothing is worth waiting for (an Aborted vote decides alone).
    expected: usize,
    first: Instant,
    /// Some of its acceptances were already submitted to the log: never wait for it again.
    flushed: bool,
}

impl Driver {
    pub fn new(
        core: Replica,
        (log, outcomes): (Storage, Index),
        peers: Peers,
        rx: mpsc::UnboundedReceiver<Command>,
        max_open: usize,
        life: Arc<Lifecycle>,
        fsync_stall: Duration,
    ) -> Driver {
        Driver {
            open: HashSet::new(),
            max_open,
            core,
            log_bytes: log.log.size_bytes(),
            log_path: log.log.path().to_path_buf(),
            outcomes,
            log: Some(log),
            in_flight: None,
            held: Vec::new(),
            next_records: Vec::new(),
            next_sync: false,
            next_outputs: Vec::new(),
            peers,
            // The core was recovered at time 0: now.
            epoch: Instant::now(),
            waiters: HashMap::new(),
            decided: HashMap::new(),
            rx,
            counters: Counters::default(),
            live_at_rewrite: 0,
            votes: HashMap::new(),
            life,
            in_flight_since: None,
            next_accept_since: None,
            in_flight_accept_since: None,
            stalled: false,
            fsync_stall,
            drained: Vec::new(),
            timers_after: None,
            traces: Traces::default(),
            not_heard_said: HashMap::new(),
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Runs until every command sender is gone. An acceptor-log failure ends the process: a
    /// replica that cannot make its promises durable must not answer at all.
    ///
    /// At most one batch is being written at a time. While it is, commands keep being applied
    /// and their records gather into the next batch (group commit grows with load); every
    /// output waits for the batch that carries its records and for all earlier ones.
    pub async fn run(mut self) {
        loop {
            self.collect();
            let hold = self.vote_hold();
            if hold.is_none() {
                self.submit();
            }
            let mut wake = tokio::time::Instant::now()
                + match self.core.next_deadline() {
                    Some(at) => Duration::from_millis(at.saturating_sub(self.now())),
                    None => Duration::from_secs(3600),
                };
            if let Some(hold) = hold {
                wake = wake.min(tokio::time::Instant::from_std(hold));
            }
            if let (Some(since), false) = (self.in_flight_since, self.stalled) {
                wake = wake.min(tokio::time::Instant::from_std(since + self.fsync_stall));
            }
            if let Some(at) = self.timers_after {
                wake = wake.min(tokio::time::Instant::from_std(at));
            }
            let sleep = tokio::time::sleep_until(wake);
            tokio::select! {
                cmd = self.rx.recv() => {
                    let Some(cmd) = cmd else { break };
                    self.apply(cmd);
                    let mut taken = 1;
                    while taken < 4096 {
                        match self.rx.try_recv() {
                            Ok(cmd) => { self.apply(cmd); taken += 1; }
                            Err(_) => break,
                        }
                    }
                }
                done = async {
                    match self.in_flight.as_mut() {
                        Some(job) => job.await,
                        None => std::future::pending().await,
                    }
                } => {
                    self.in_flight = None;
                    self.written(done);
                }
                _ = sleep => {}
            }
            self.check_stall();
            if tokio::time::Instant::now() > wake + RESUMED_LATE {
                // This process was not run for a while (paused, swapped out, a frozen VM):
                // its timers all look expired, but the messages that would have stopped them
                // are queued in its sockets. Read those first, so that a resumed leader does
                // not take over (and abort) its own healthy transactions.
                tracing::warn!(
                    late_ms = (tokio::time::Instant::now() - wake).as_millis() as u64,
                    "this replica was not scheduled for a while; reading queued messages \
                     before acting on its timers"
                );
                self.timers_after = Some(Instant::now() + RESUME_GRACE);
            }
            if self.timers_after.is_some_and(|at| Instant::now() >= at) {
                self.timers_after = None;
            }
            if self.timers_after.is_none() {
                let now = self.now();
                self.core.on_tick(now);
            }
            if !self.drained.is_empty() && self.idle() {
                for reply in self.drained.drain(..) {
                    let _ = reply.send(());
                }
            }
        }
        tracing::info!("driver stopped: no more commands");
    }

    /// A write that has not returned within `fsync_stall` takes the replica out of service.
    fn check_stall(&mut self) {
        let Some(since) = self.in_flight_since else {
            return;
        };
        if self.stalled || since.elapsed() < self.fsync_stall {
            return;
        }
        self.stalled = true;
        let path = self.log_path.display();
        let reason = format!(
            "a write to the acceptor log {path} has not returned for {} ms",
            since.elapsed().as_millis()
        );
        tracing::error!(
            "{reason}: this replica is degraded (NOT_SERVING, Begin refused) until it returns; \
             check the disk"
        );
        self.life.set_degraded(Some(reason));
    }

    /// Nothing led here is still deciding and no client waits for an answer.
    fn idle(&self) -> bool {
        self.waiters.is_empty() && self.core.stats().leading == 0
    }

    fn apply(&mut self, cmd: Command) {
        let now = self.now();
        match cmd {
            Command::Begin {
                timeout_ms,
                reply,
                trace,
            } => {
                if self.open.len() >= self.max_open {
                    // Forget the ones that left Open since (committing, decided, gone):
                    // paid only near the limit, so a Begin stays O(1) otherwise.
                    let core = &self.core;
                    self.open.retain(|t| core.open_deadline(*t).is_some());
                    if self.open.len() >= self.max_open {
                        let _ = reply.send(None);
                        return;
                    }
                }
                let txn = self.core.begin_for(now, rand::random(), timeout_ms);
                self.open.insert(txn);
                self.traces.set(txn, trace);
                let deadline_ms = self
                    .core
                    .open_deadline(txn)
                    .map_or(0, |at| at.saturating_sub(now));
                let unix = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                let _ = reply.send(Some((txn, unix + deadline_ms)));
            }
            Command::Enlist { txn, participant } => {
                let (code, message) = match self.core.enlist(now, txn, participant.clone()) {
                    Ok(()) => (0, String::new()),
                    Err(e) => {
                        tracing::warn!(txid = %txn, participant = %participant.id, "refused an enlistment: {e}");
                        let status = tonic::Status::from(crate::error::CoordinatorError::from(e));
                        (status.code() as i32, status.message().to_string())
                    }
                };
                self.peers.enlisted(&participant, txn, code, message);
            }
            Command::Commit {
                txn,
                until,
                reply,
                trace,
            } => {
                paxos_commit_proto::crash_point("coordinator-before-prepare");
                self.traces.deciding(txn, trace);
                let result = self.core.commit(now, txn);
                if let Ok(Some(outcome)) = &result {
                    self.traces.decided(txn, *outcome);
                }
                self.answer_or_wait(txn, until, result, reply);
            }
            Command::Abort {
                txn,
                until,
                reply,
                trace,
            } => {
                self.traces.deciding(txn, trace);
                let result = self.core.abort(now, txn);
                if let Ok(Some(outcome)) = &result {
                    self.traces.decided(txn, *outcome);
                }
                self.answer_or_wait(txn, until, result, reply);
            }
            Command::Resolve {
                txn,
                participant,
                participants,
                reply,
            } => {
                let result = self
                    .core
                    .resolve(now, txn, participant.as_deref(), &participants);
                self.answer_or_wait(txn, Until::Decided, result, reply);
            }
            Command::Deliver { replica, msgs } => {
                if let Some((from, incarnation)) = replica {
                    if !self.core.hears(from, incarnation) {
                        self.not_heard(from, incarnation);
                        return;
                    }
                }
                let draining = self.life.is_draining();
                let me = self.core.config().id;
                for (from, msg, trace) in msgs {
                    // A stopping replica finishes what it leads and nothing else: for every
                    // other transaction it is already gone.
                    if draining && msg.txn().leader() != me {
                        continue;
                    }
                    if let Msg::Nack {
                        txn,
                        ballot,
                        promised,
                    } = &msg
                    {
                        tracing::info!(
                            txid = %txn,
                            ballot,
                            promised,
                            acceptor = from,
                            "nack: an acceptor refused this replica's ballot; a higher one follows"
                        );
                    }
                    let finished = match (&msg, trace) {
                        (
                            Msg::Phase2a {
                                txn,
                                participant,
                                ballot,
                                ..
                            },
                            Some(trace),
                        ) => {
                            self.traces.accepting(*txn, participant, *ballot, trace);
                            None
                        }
                        (Msg::Finished { txn, .. }, _) => Some(*txn),
                        _ => None,
                    };
                    self.core.on_message(now, from, msg);
                    if let Some(txn) = finished {
                        self.traces.forget(txn);
                    }
                }
            }
            Command::Drain { reply } => self.drained.push(reply),
            Command::Applied { txn, participant } => {
                self.core.on_applied(now, txn, &participant);
            }
            Command::Status { txn, reply } => {
                let mut status = self.core.status(txn);
                if status.decided.is_none() && !status.open {
                    // Forgotten by the core after the retention window: the archive still
                    // knows the outcome.
                    if let Some(outcome) = self.outcomes.get(txn) {
                        status.known = true;
                        status.expired = false;
                        status.decided = Some(outcome);
                        status.finished = true;
                    }
                }
                let answer = (status, self.core.cause(txn).cloned());
                self.reply_after_sync(move || {
                    let _ = reply.send(answer);
                });
            }
            Command::Outcomes { txns, reply } => {
                let outcomes = txns
                    .into_iter()
                    .map(|txn| {
                        self.core
                            .status(txn)
                            .decided
                            .or_else(|| self.outcomes.get(txn))
                    })
                    .collect();
                // Only what is durable is told, as for Status.
                self.reply_after_sync(move || {
                    let _ = reply.send(outcomes);
                });
            }
            Command::Committed {
                after,
                limit,
                reply,
            } => {
                let committed = self.core.committed_after(after, limit);
                self.reply_after_sync(move || {
                    let _ = reply.send(committed);
                });
            }
            Command::Join {
                from,
                incarnation,
                mode,
                reply,
            } => {
                let answer = self.core.on_join(from, incarnation, mode);
                match answer {
                    JoinAnswer::Admitted => {
                        tracing::info!(replica = from, incarnation, ?mode, "admitted a replica")
                    }
                    JoinAnswer::Known { incarnation: known } => tracing::error!(
                        replica = from,
                        incarnation,
                        known,
                        ?mode,
                        "refused a replica's join: it ran before as another incarnation, so its \
                         acceptor log was lost (it must be restored, or the replica started with \
                         --rejoin)"
                    ),
                }
                let own = self.core.incarnation().unwrap_or(0);
                self.reply_after_sync(move || {
                    let _ = reply.send((answer, own));
                });
            }
            Command::Hears {
                from,
                incarnation,
                reply,
            } => {
                let heard = if self.core.hears(from, incarnation) {
                    Ok(())
                } else {
                    self.not_heard(from, incarnation);
                    Err(self.core.fence(from).unwrap_or(0))
                };
                self.reply_after_sync(move || {
                    let _ = reply.send(heard);
                });
            }
            Command::JoinAnswered { from, incarnation } => {
                if let Some(known) = self
                    .core
                    .fence(from)
                    .filter(|&k| incarnation != 0 && k != incarnation)
                {
                    tracing::error!(
                        replica = from,
                        incarnation,
                        known,
                        "a peer answered this replica's join under an incarnation other than \
                         the one recorded here: kept the recorded one (only the peer's own \
                         --rejoin replaces it); that peer may have lost its log"
                    );
                }
                self.core.on_join_answer(from, incarnation);
            }
            Command::TryAdmit { reply } => {
                let admitted = self.core.try_admit(now);
                self.reply_after_sync(move || {
                    let _ = reply.send(admitted);
                });
            }
            Command::Info { reply } => {
                let _ = reply.send(Info {
                    stats: self.core.stats(),
                    log_bytes: self.log_bytes,
                    now_ms: now,
                    counters: self.counters,
                    sent: self.peers.sent.clone(),
                });
            }
        }
    }

    fn answer_or_wait(
        &mut self,
        txn: TxnId,
        until: Until,
        result: Result<Option<Outcome>, TxnError>,
        reply: DecisionReply,
    ) {
        match result {
            Err(e) => {
                let _ = reply.send(Err(e));
            }
            Ok(Some(outcome)) if until == Until::Decided || self.core.status(txn).finished => {
                let cause = self.core.cause(txn).cloned();
                let decision = Decision::from_status(outcome, cause, &self.core.status(txn));
                self.reply_after_sync(move || {
                    let _ = reply.send(Ok(decision));
                });
            }
            Ok(_) => self.waiters.entry(txn).or_default().push(Waiter {
                until,
                reply,
                since: Instant::now(),
                decided_at: None,
            }),
        }
    }

    /// Moves the core's outputs into the next batch.
    fn collect(&mut self) {
        for o in self.core.drain() {
            match o {
                Output::Persist(r) => {
                    if matches!(r, Record::Round { .. }) {
                        // A new round is a phase 1: this replica takes a transaction over
                        // (or recovers one of its own whose votes did not all come).
                        metrics::counter!("paxos_commit_takeovers_total").increment(1);
                    }
                    if matches!(r, Record::Accept { .. }) && self.next_accept_since.is_none() {
                        self.next_accept_since = Some(Instant::now());
                    }
                    if let Record::Accept {
                        txn,
                        ballot: 0,
                        vote,
                        participants,
                        ..
                    } = &r
                    {
                        let tally = self.votes.entry(*txn).or_insert_with(|| VoteTally {
                            seen: 0,
                            expected: participants.len(),
                            first: Instant::now(),
                            flushed: false,
                        });
                        tally.seen += 1;
                        if *vote == Vote::Aborted {
                            tally.expected = 0;
                        }
                    }
                    self.next_records.push(r);
                    self.next_sync = true;
                }
                Output::PersistLazy(r) => self.next_records.push(r),
                other => self.next_outputs.push(Held::Out(other)),
            }
        }
    }

    /// Until when the next batch's fsync waits for more votes of its transactions: `None`
    /// when it need not (or cannot start anyway).
    fn vote_hold(&self) -> Option<Instant> {
        if self.in_flight.is_some() || !self.next_sync || self.next_records.len() >= 1024 {
            return None;
        }
        let now = Instant::now();
        self.votes
            .values()
            .filter(|t| !t.flushed && t.seen < t.expected)
            .map(|t| t.first + VOTE_HOLD)
            .filter(|until| *until > now)
            .min()
    }

    /// Starts writing the next batch if the log is free. Outputs that need no new durable
    /// record leave at once when nothing is being written.
    fn submit(&mut self) {
        if self.in_flight.is_some() {
            return;
        }
        let lazy_pile = self.next_records.len() >= 1024;
        if !self.next_sync && !lazy_pile {
            let outputs = std::mem::take(&mut self.next_outputs);
            self.release(outputs);
            return;
        }
        let Some(Storage {
            mut log,
            mut archive,
        }) = self.log.take()
        else {
            return;
        };
        // Every tally with acceptances in this batch is done waiting.
        self.votes.retain(|_, t| {
            t.flushed = true;
            t.seen < t.expected && t.first.elapsed() < VOTE_TALLY_KEEP
        });
        let records = std::mem::take(&mut self.next_records);
        // Archived: every finished outcome, and every abort as soon as it is decided (an
        // abort of an open transaction never reaches the acceptors, so it never "finishes"
        // there; aborts are few, and a second entry for one costs 9 bytes).
        let finished: Vec<(TxnId, Outcome)> = records
            .iter()
            .filter_map(|r| match r {
                Record::Finished { txn, outcome } => Some((*txn, *outcome)),
                Record::Decided {
                    txn,
                    outcome,
                    participants,
                } if *outcome == Outcome::Aborted || participants.is_empty() => {
                    Some((*txn, *outcome))
                }
                _ => None,
            })
            .collect();
        for (txn, outcome) in &finished {
            self.outcomes.insert(*txn, *outcome);
        }
        self.next_sync = false;
        self.held = std::mem::take(&mut self.next_outputs);
        let compact = log.records_since_rewrite() > COMPACT_AFTER.max(2 * self.live_at_rewrite);
        // Compaction writes the whole live state instead of the batch: the core already
        // reflects every record of the batch, so nothing is lost.
        let live = compact.then(|| self.core.durable_records());
        self.in_flight_since = Some(Instant::now());
        self.in_flight_accept_since = self.next_accept_since.take();
        self.in_flight = Some(tokio::task::spawn_blocking(move || {
            let accepts = records.iter().any(|r| matches!(r, Record::Accept { .. }));
            let result = match live {
                Some(live) => {
                    let before = log.size_bytes();
                    log.rewrite(&live).map(|()| Written {
                        records: live.len(),
                        accepts,
                        compacted_from: Some(before),
                        new_day: false,
                    })
                }
                None => log.append_batch(&records).map(|()| Written {
                    records: records.len(),
                    accepts,
                    compacted_from: None,
                    new_day: false,
                }),
            };
            // The archive is a hint (the log holds the same outcomes for the retention
            // window): its failure is reported, never fatal.
            let result = result.map(|mut w| {
                match archive.append(&finished).and_then(|rolled| {
                    archive.sync_now_and_then()?;
                    Ok(rolled)
                }) {
                    Ok(rolled) => w.new_day = rolled,
                    Err(e) => tracing::warn!("archiving decided outcomes: {e}"),
                }
                w
            });
            (Storage { log, archive }, result)
        }));
    }

    fn written(
        &mut self,
        done: Result<(Storage, Result<Written, LogError>), tokio::task::JoinError>,
    ) {
        let (storage, written) = match done {
            Ok((storage, Ok(w))) => (storage, w),
            Ok((_, Err(e))) => {
                tracing::error!("acceptor log failed, stopping this replica: {e}");
                std::process::exit(70);
            }
            Err(e) => {
                tracing::error!("acceptor log task failed, stopping this replica: {e}");
                std::process::exit(70);
            }
        };
        if let Some(since) = self.in_flight_accept_since.take() {
            metrics::histogram!("paxos_commit_phase_seconds", "phase" => "accept")
                .record(since.elapsed().as_secs_f64());
        }
        if let Some(since) = self.in_flight_since {
            // Write and fsync of one group-commit batch (or a compaction's rewrite).
            metrics::histogram!("paxos_commit_log_fsync_seconds")
                .record(since.elapsed().as_secs_f64());
            metrics::histogram!("paxos_commit_log_batch_records").record(written.records as f64);
        }
        if let Some(since) = self.in_flight_since.take() {
            if std::mem::take(&mut self.stalled) {
                tracing::warn!(
                    stalled_ms = since.elapsed().as_millis() as u64,
                    "the acceptor log is writing again; this replica serves again"
                );
                self.life.set_degraded(None);
            }
        }
        if written.accepts {
            // Durable here, but the phase 2b has not left.
            paxos_commit_proto::crash_point("coordinator-after-accept");
        }
        if let Some(before) = written.compacted_from {
            metrics::counter!("paxos_commit_log_compactions_total").increment(1);
            self.live_at_rewrite = written.records as u64;
            tracing::info!(
                before,
                after = storage.log.size_bytes(),
                records = written.records,
                "compacted the acceptor log"
            );
        }
        if written.new_day {
            self.outcomes.prune();
        }
        self.log_bytes = storage.log.size_bytes();
        self.log = Some(storage);
        self.counters.fsyncs += 1;
        self.counters.records += written.records as u64;
        self.counters.batches += 1;
        let outputs = std::mem::take(&mut self.held);
        self.release(outputs);
    }

    /// Lets outputs whose records are durable go: messages out, clients answered.
    fn release(&mut self, outputs: Vec<Held>) {
        if outputs
            .iter()
            .any(|o| matches!(o, Held::Out(Output::Decided { .. })))
        {
            paxos_commit_proto::crash_point("coordinator-after-decision");
        }
        for o in outputs {
            match o {
                Held::Out(Output::Persist(_) | Output::PersistLazy(_)) => {}
                // Not admitted yet, this replica has nothing to say to its peers, and a
                // stream under an incarnation they do not know yet would look like a
                // replaced process's.
                Held::Out(Output::Send {
                    to: Dest::Replica(_),
                    ..
                }) if !self.core.is_admitted() => {}
                Held::Out(Output::Send { to, msg }) => {
                    self.note_send(&to, &msg);
                    if let Msg::Phase2b {
                        txn, participant, ..
                    } = &msg
                    {
                        self.traces.accepted(*txn, participant);
                    }
                    let trace = self.traces.get(msg.txn()).cloned();
                    self.peers.send(to, msg, trace.as_ref())
                }
                Held::Out(Output::Decided {
                    txn,
                    outcome,
                    cause,
                }) => {
                    metrics::counter!(
                        "paxos_commit_transactions_total",
                        "outcome" => if outcome == Outcome::Committed { "committed" } else { "aborted" }
                    )
                    .increment(1);
                    if outcome == Outcome::Aborted {
                        let reason = cause.as_ref().map(ToString::to_string).unwrap_or_default();
                        tracing::info!(txid = %txn, %reason, "decided: aborted");
                    } else {
                        tracing::debug!(txid = %txn, "decided: committed");
                    }
                    self.traces.decided(txn, outcome);
                    let decision = Decision::from_status(outcome, cause, &self.core.status(txn));
                    self.on_decided(txn, decision)
                }
                Held::Out(Output::Finished { txn, outcome }) => {
                    self.traces.forget(txn);
                    self.on_finished(txn, outcome)
                }
                Held::Reply(reply) => reply(),
            }
        }
    }

    /// What an operator must see at INFO: a takeover starting (a phase 1a, logged once, as
    /// sent to this replica's own acceptor) and a ballot refused by this acceptor (a nack).
    fn note_send(&self, to: &paxos_commit_core::Dest, msg: &Msg) {
        let me = paxos_commit_core::Dest::Replica(self.core.config().id);
        match msg {
            Msg::Phase1a { txn, ballot, .. } if *to == me => {
                tracing::info!(
                txid = %txn,
                ballot,
                leader = txn.leader(),
                "takeover: starting phase 1 for a transaction whose leader went silent or \
                 that a participant asked about"
                )
            }
            Msg::Nack {
                txn,
                ballot,
                promised,
            } => tracing::info!(
                txid = %txn,
                ballot,
                promised,
                ?to,
                "nack: refused a ballot below this acceptor's promise"
            ),
            _ => tracing::debug!(?to, kind = crate::peers::kind(msg), txn = %msg.txn(), "send"),
        }
    }

    /// Messages from an incarnation of a peer other than the one admitted here: a process
    /// whose replica was replaced (`--rejoin`) while it still ran, or messages delayed from
    /// before. Said once a minute per peer at most, since such a sender retries forever.
    fn not_heard(&mut self, from: ReplicaId, incarnation: u64) {
        self.counters.not_heard += 1;
        metrics::counter!("paxos_commit_not_heard_total").increment(1);
        let now = Instant::now();
        let last = self.not_heard_said.entry(from).or_insert(now);
        if *last == now || now.duration_since(*last) >= Duration::from_secs(60) {
            *last = now;
            tracing::warn!(
                replica = from,
                incarnation,
                known = ?self.core.stats().incarnation,
                dropped = self.counters.not_heard,
                "dropped messages from an incarnation of a replica this one does not know (a \
                 replaced process still running, or messages from before it was replaced)"
            );
        }
    }

    /// Answers once everything produced so far is durable.
    fn reply_after_sync(&mut self, reply: impl FnOnce() + Send + 'static) {
        self.collect();
        self.next_outputs.push(Held::Reply(Box::new(reply)));
    }

    fn on_decided(&mut self, txn: TxnId, decision: Decision) {
        let Some(waiters) = self.waiters.remove(&txn) else {
            return;
        };
        let mut later = Vec::new();
        if let Some(first) = waiters.first() {
            metrics::histogram!("paxos_commit_phase_seconds", "phase" => "decide")
                .record(first.since.elapsed().as_secs_f64());
        }
        for mut w in waiters {
            w.decided_at = Some(Instant::now());
            match w.until {
                Until::Decided => {
                    let _ = w.reply.send(Ok(decision.clone()));
                }
                Until::Applied => later.push(w),
            }
        }
        if !later.is_empty() {
            self.waiters.insert(txn, later);
            self.decided.insert(txn, decision);
        }
    }

    fn on_finished(&mut self, txn: TxnId, outcome: Outcome) {
        let mut decision = self.decided.remove(&txn).unwrap_or(Decision {
            outcome,
            cause: None,
            all_applied: true,
            not_applied: Vec::new(),
        });
        decision.all_applied = true;
        decision.not_applied.clear();
        let waiters = self.waiters.remove(&txn).unwrap_or_default();
        if let Some(decided_at) = waiters.first().and_then(|w| w.decided_at) {
            metrics::histogram!("paxos_commit_phase_seconds", "phase" => "apply")
                .record(decided_at.elapsed().as_secs_f64());
        }
        for w in waiters {
            let _ = w.reply.send(Ok(decision.clone()));
        }
    }
}
