//! The one task that owns a replica's core and its acceptor log.
//!
//! gRPC handlers send [`Command`]s here with a oneshot for the reply. The loop takes every
//! command already queued, feeds them to the core, then drains the outputs in the order the
//! core's contract demands: all records of the batch go to the log in one append and one
//! fsync (group commit), and only then do messages leave and clients hear of decisions.
//! Commands that arrive during the fsync form the next batch.

use crate::log::DurableLog;
use crate::peers::Peers;
use paxos_commit_core::{
    LocalStatus, Msg, Outcome, Output, Participant, Record, Replica, ReplicaId, Stats, TxnError,
    TxnId,
};
use std::collections::HashMap;
use std::time::{Instant, SystemTime, UNIX_EPOCH};
use tokio::sync::{mpsc, oneshot};

/// A decision and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub outcome: Outcome,
    pub reason: String,
}

/// When a waiting client is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Until {
    Decided,
    Applied,
}

pub type DecisionReply = oneshot::Sender<Result<Decision, TxnError>>;

pub enum Command {
    Begin {
        timeout_ms: u64,
        reply: oneshot::Sender<(TxnId, u64)>,
    },
    Enlist {
        txn: TxnId,
        participant: Participant,
        reply: oneshot::Sender<Result<(), TxnError>>,
    },
    Commit {
        txn: TxnId,
        until: Until,
        reply: DecisionReply,
    },
    Abort {
        txn: TxnId,
        until: Until,
        reply: DecisionReply,
    },
    Resolve {
        txn: TxnId,
        participant: Option<String>,
        participants: Vec<Participant>,
        reply: DecisionReply,
    },
    Deliver {
        msgs: Vec<(ReplicaId, Msg)>,
    },
    Applied {
        txn: TxnId,
        participant: String,
    },
    Status {
        txn: TxnId,
        reply: oneshot::Sender<(LocalStatus, Option<String>)>,
    },
    Info {
        reply: oneshot::Sender<Info>,
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
}

/// Counters of what the replica did, for the protocol-cost figures and txctl.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counters {
    pub fsyncs: u64,
    pub records: u64,
    pub batches: u64,
}

pub struct Driver {
    core: Replica,
    log: DurableLog<Record>,
    /// Hints written with the next durable batch; nothing waits for them.
    lazy: Vec<Record>,
    peers: Peers,
    epoch: Instant,
    waiters: HashMap<TxnId, Vec<Waiter>>,
    /// Decisions seen for transactions that still have clients waiting for `Applied`.
    decided: HashMap<TxnId, Decision>,
    rx: mpsc::UnboundedReceiver<Command>,
    counters: Counters,
}

/// Compact the log once this many records were appended since the last rewrite.
const COMPACT_AFTER: u64 = 200_000;

impl Driver {
    pub fn new(
        core: Replica,
        log: DurableLog<Record>,
        peers: Peers,
        epoch: Instant,
        rx: mpsc::UnboundedReceiver<Command>,
    ) -> Driver {
        Driver {
            core,
            log,
            lazy: Vec::new(),
            peers,
            epoch,
            waiters: HashMap::new(),
            decided: HashMap::new(),
            rx,
            counters: Counters::default(),
        }
    }

    fn now(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Runs until every command sender is gone. An acceptor-log failure ends the process: a
    /// replica that cannot make its promises durable must not answer at all.
    pub async fn run(mut self) {
        // Outputs of recovery (none today) and timers armed by it.
        self.flush().await;
        loop {
            let sleep = match self.core.next_deadline() {
                Some(at) => {
                    let wait = at.saturating_sub(self.now());
                    tokio::time::sleep(std::time::Duration::from_millis(wait))
                }
                None => tokio::time::sleep(std::time::Duration::from_secs(3600)),
            };
            tokio::select! {
                cmd = self.rx.recv() => {
                    let Some(cmd) = cmd else { break };
                    self.apply(cmd);
                    // Group commit: everything that queued up meanwhile joins this batch.
                    let mut taken = 1;
                    while taken < 4096 {
                        match self.rx.try_recv() {
                            Ok(cmd) => { self.apply(cmd); taken += 1; }
                            Err(_) => break,
                        }
                    }
                }
                _ = sleep => {}
            }
            let now = self.now();
            self.core.on_tick(now);
            self.flush().await;
        }
    }

    fn apply(&mut self, cmd: Command) {
        let now = self.now();
        match cmd {
            Command::Begin { timeout_ms, reply } => {
                let txn = self.core.begin(now, rand::random());
                let _ = timeout_ms;
                let deadline_ms = self
                    .core
                    .open_deadline(txn)
                    .map_or(0, |at| at.saturating_sub(now));
                let unix = SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis() as u64);
                let _ = reply.send((txn, unix + deadline_ms));
            }
            Command::Enlist {
                txn,
                participant,
                reply,
            } => {
                let _ = reply.send(self.core.enlist(now, txn, participant));
            }
            Command::Commit { txn, until, reply } => {
                paxos_commit_proto::crash_point("coordinator-before-prepare");
                let result = self.core.commit(now, txn);
                self.answer_or_wait(txn, until, result, reply);
            }
            Command::Abort { txn, until, reply } => {
                let result = self.core.abort(now, txn);
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
            Command::Deliver { msgs } => {
                for (from, msg) in msgs {
                    self.core.on_message(now, from, msg);
                }
            }
            Command::Applied { txn, participant } => {
                self.core.on_applied(now, txn, &participant);
            }
            Command::Status { txn, reply } => {
                let reason = self.core.reason(txn).map(str::to_string);
                let _ = reply.send((self.core.status(txn), reason));
            }
            Command::Info { reply } => {
                let _ = reply.send(Info {
                    stats: self.core.stats(),
                    log_bytes: self.log.size_bytes(),
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
                let reason = self.core.reason(txn).unwrap_or_default().to_string();
                let _ = reply.send(Ok(Decision { outcome, reason }));
            }
            Ok(_) => self
                .waiters
                .entry(txn)
                .or_default()
                .push(Waiter { until, reply }),
        }
    }

    /// Drains the core's outputs: durable records first (one append, one fsync), then
    /// messages and answers.
    async fn flush(&mut self) {
        let outputs = self.core.drain();
        if outputs.is_empty() {
            return;
        }
        let mut durable: Vec<Record> = Vec::new();
        for o in &outputs {
            match o {
                Output::Persist(r) => durable.push(r.clone()),
                Output::PersistLazy(r) => self.lazy.push(r.clone()),
                _ => {}
            }
        }
        if !durable.is_empty() || self.lazy.len() >= 1024 {
            let mut batch = std::mem::take(&mut self.lazy);
            batch.extend(durable);
            let log = &mut self.log;
            let result = tokio::task::block_in_place(|| log.append_batch(&batch));
            if let Err(e) = result {
                tracing::error!("acceptor log failed, stopping this replica: {e}");
                std::process::exit(70);
            }
            if batch.iter().any(|r| matches!(r, Record::Accept { .. })) {
                // Durable here, but the phase 2b has not left.
                paxos_commit_proto::crash_point("coordinator-after-accept");
            }
            self.counters.fsyncs += 1;
            self.counters.records += batch.len() as u64;
            self.counters.batches += 1;
            metrics_fsync(batch.len());
            if self.log.records_since_rewrite() > COMPACT_AFTER {
                self.compact();
            }
        }
        if outputs.iter().any(|o| matches!(o, Output::Decided { .. })) {
            paxos_commit_proto::crash_point("coordinator-after-decision");
        }
        for o in outputs {
            match o {
                Output::Persist(_) | Output::PersistLazy(_) => {}
                Output::Send { to, msg } => self.peers.send(to, msg),
                Output::Decided {
                    txn,
                    outcome,
                    reason,
                } => self.on_decided(txn, Decision { outcome, reason }),
                Output::Finished { txn, outcome } => self.on_finished(txn, outcome),
            }
        }
    }

    fn compact(&mut self) {
        let mut live = self.core.durable_records();
        live.append(&mut self.lazy);
        let log = &mut self.log;
        let before = log.size_bytes();
        match tokio::task::block_in_place(|| log.rewrite(&live)) {
            Ok(()) => tracing::info!(
                before,
                after = self.log.size_bytes(),
                records = live.len(),
                "compacted the acceptor log"
            ),
            Err(e) => {
                tracing::error!("acceptor log compaction failed, stopping this replica: {e}");
                std::process::exit(70);
            }
        }
    }

    fn on_decided(&mut self, txn: TxnId, decision: Decision) {
        let Some(waiters) = self.waiters.remove(&txn) else {
            return;
        };
        let mut later = Vec::new();
        for w in waiters {
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
        let decision = self.decided.remove(&txn).unwrap_or(Decision {
            outcome,
            reason: String::new(),
        });
        for w in self.waiters.remove(&txn).unwrap_or_default() {
            let _ = w.reply.send(Ok(decision.clone()));
        }
    }
}

fn metrics_fsync(records: usize) {
    tracing::trace!(records, "acceptor log batch synced");
}
