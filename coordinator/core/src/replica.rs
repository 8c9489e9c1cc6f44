//! One coordinator replica as a deterministic state machine: the acceptor of every
//! transaction, the leader of those begun on it, and the proposer that takes over those whose
//! leader went silent.
//!
//! Inputs are method calls carrying `now` (milliseconds of the shell's monotonic clock); the
//! outputs queue up in order and are taken with [`Replica::drain`]. Randomness (takeover
//! back-off) comes from a seed. The same code runs in the server, the unit tests and the
//! stateright model.

use crate::acceptor::{AcceptorTxn, Reply};
use crate::coordination::{Coordination, Phase};
use crate::msg::{Dest, Msg, Output, Record};
use crate::types::{
    ballot_of, ballot_owner, majority, Ballot, Outcome, Participant, ReplicaId, TxnId, Vote,
};
use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::fmt;

/// Static configuration of a replica.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Config {
    pub id: ReplicaId,
    /// 2F + 1.
    pub replicas: u32,
    /// Silence after which an undecided transaction is taken over (the leader itself uses it to
    /// stop waiting for votes that will not come).
    pub takeover_after_ms: u64,
    /// How long a begun transaction may stay open before Commit.
    pub open_timeout_ms: u64,
    /// Interval at which a decision is pushed again to participants that did not confirm it.
    pub resend_after_ms: u64,
    /// How long a finished transaction stays answerable before it is forgotten.
    pub retention_ms: u64,
}

impl Config {
    pub fn new(id: ReplicaId, replicas: u32) -> Config {
        Config {
            id,
            replicas,
            takeover_after_ms: 2_000,
            open_timeout_ms: 60_000,
            resend_after_ms: 1_000,
            retention_ms: 300_000,
        }
    }
}

/// Why a client request about a transaction cannot be served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TxnError {
    /// This replica never heard of it (or forgot it).
    Unknown { txn: TxnId, expired: bool },
    /// The transaction is led by another replica.
    NotLeader { txn: TxnId, leader: ReplicaId },
    /// Enlisting after the participant set was frozen.
    Frozen { txn: TxnId },
}

impl fmt::Display for TxnError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TxnError::Unknown {
                txn,
                expired: false,
            } => write!(f, "transaction {txn} is unknown to this replica"),
            TxnError::Unknown { txn, expired: true } => write!(
                f,
                "transaction {txn} was forgotten after its retention window"
            ),
            TxnError::NotLeader { txn, leader } => {
                write!(f, "transaction {txn} is led by replica {leader}")
            }
            TxnError::Frozen { txn } => write!(
                f,
                "transaction {txn} is committing or decided: no new participant may join"
            ),
        }
    }
}

impl std::error::Error for TxnError {}

/// What this replica knows of a transaction, for GetStatus and txctl.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalStatus {
    pub known: bool,
    pub expired: bool,
    pub decided: Option<Outcome>,
    pub open: bool,
    pub participants: Vec<Participant>,
    pub promised: Ballot,
    pub accepted: BTreeMap<String, (Ballot, Vote)>,
    pub applied: BTreeSet<String>,
    pub finished: bool,
    pub since: Option<u64>,
}

/// Counters for the cluster view.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Stats {
    pub leading: usize,
    pub undecided: usize,
    pub oldest_undecided: Option<(TxnId, u64)>,
    pub decided_retained: usize,
}

/// Transactions forgotten recently, so that GetStatus can say "expired" rather than "never
/// seen". Bounded, so memory stays flat under sustained load.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
struct Expired {
    set: BTreeSet<TxnId>,
    order: VecDeque<TxnId>,
}

impl Expired {
    const CAPACITY: usize = 100_000;

    fn insert(&mut self, txn: TxnId) {
        if self.set.insert(txn) {
            self.order.push_back(txn);
            if self.order.len() > Self::CAPACITY {
                if let Some(old) = self.order.pop_front() {
                    self.set.remove(&old);
                }
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Replica {
    cfg: Config,
    /// Highest round used as a proposer (durable via `Record::Round`).
    round: u64,
    acceptor: BTreeMap<TxnId, AcceptorTxn>,
    coordination: BTreeMap<TxnId, Coordination>,
    /// One timer per transaction; what it does when it fires follows from the state.
    timers: BTreeMap<TxnId, u64>,
    timer_index: BTreeSet<(u64, TxnId)>,
    expired: Expired,
    rng: u64,
    /// Messages this replica sent to itself, delivered within the same step.
    loopback: VecDeque<Msg>,
    out: Vec<Output>,
}

impl Replica {
    pub fn new(cfg: Config, seed: u64) -> Replica {
        Replica {
            cfg,
            round: 0,
            acceptor: BTreeMap::new(),
            coordination: BTreeMap::new(),
            timers: BTreeMap::new(),
            timer_index: BTreeSet::new(),
            expired: Expired::default(),
            rng: seed | 1,
            loopback: VecDeque::new(),
            out: Vec::new(),
        }
    }

    /// Rebuilds a replica from its durable records. Undecided transactions get a takeover
    /// timer and decided-but-unfinished ones a resend timer, so that a restarted replica
    /// finishes what it knows of.
    pub fn recover(cfg: Config, seed: u64, records: &[Record], now: u64) -> Replica {
        let mut replica = Replica::new(cfg, seed);
        for record in records {
            match record {
                Record::Round { round } => replica.round = replica.round.max(*round),
                other => {
                    if let Some(txn) = record_txn(other) {
                        let entry = replica.acceptor.entry(txn).or_default();
                        entry.since = now;
                        entry.apply(other);
                    }
                }
            }
        }
        let txns: Vec<(TxnId, bool)> = replica
            .acceptor
            .iter()
            .map(|(t, a)| (*t, a.finished))
            .collect();
        for (txn, finished) in txns {
            let after = if finished {
                replica.cfg.retention_ms
            } else {
                replica.cfg.takeover_after_ms
            };
            replica.arm(txn, now + after);
        }
        replica
    }

    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Takes the outputs produced so far, in order.
    pub fn drain(&mut self) -> Vec<Output> {
        std::mem::take(&mut self.out)
    }

    /// The earliest timer deadline, for the shell to sleep until.
    pub fn next_deadline(&self) -> Option<u64> {
        self.timer_index.iter().next().map(|(at, _)| *at)
    }

    /// Transactions with a timer armed (the model checker turns these into its own timers).
    pub fn armed(&self) -> impl Iterator<Item = TxnId> + '_ {
        self.timers.keys().copied()
    }

    /// The durable records that rebuild the current acceptor state (log compaction).
    pub fn durable_records(&self) -> Vec<Record> {
        let mut out = vec![Record::Round { round: self.round }];
        for (txn, acc) in &self.acceptor {
            acc.records(*txn, &mut out);
        }
        out
    }

    // ------------------------------------------------------------------ client requests

    /// Starts a transaction led by this replica. `nonce` is the shell's randomness.
    pub fn begin(&mut self, now: u64, nonce: u64) -> TxnId {
        let mut txn = TxnId::new(self.cfg.id, nonce);
        while self.coordination.contains_key(&txn) || self.acceptor.contains_key(&txn) {
            txn = TxnId::new(self.cfg.id, self.next_random());
        }
        self.coordination
            .insert(txn, Coordination::new(Phase::Open, now));
        self.arm(txn, now + self.cfg.open_timeout_ms);
        txn
    }

    /// Deadline (in shell time) of an open transaction.
    pub fn open_deadline(&self, txn: TxnId) -> Option<u64> {
        match self.coordination.get(&txn) {
            Some(c) if c.phase == Phase::Open => self.timers.get(&txn).copied(),
            _ => None,
        }
    }

    /// A participant joins the transaction (its first statement).
    pub fn enlist(
        &mut self,
        now: u64,
        txn: TxnId,
        participant: Participant,
    ) -> Result<(), TxnError> {
        let _ = now;
        let coord = self.led(txn)?;
        if coord.phase != Phase::Open {
            return Err(TxnError::Frozen { txn });
        }
        coord
            .participants
            .entry(participant.id.clone())
            .or_insert(participant);
        Ok(())
    }

    /// Commit (or Prepare): freeze R and ask every participant to vote. Returns the decision
    /// if it is already known; otherwise an `Output::Decided` follows later.
    pub fn commit(&mut self, now: u64, txn: TxnId) -> Result<Option<Outcome>, TxnError> {
        if let Some(outcome) = self.known_decision(txn) {
            return Ok(Some(outcome));
        }
        if txn.leader() != self.cfg.id || !self.coordination.contains_key(&txn) {
            // The client lost the leader and came here: settle it as a takeover would.
            return self.resolve(now, txn, None, &[]);
        }
        let coord = self.led(txn)?;
        if coord.phase != Phase::Open {
            return Ok(None);
        }
        coord.phase = Phase::Voting;
        if coord.participants.is_empty() {
            // Nothing to prepare: a transaction that touched no database commits trivially.
            self.decide(now, txn, Outcome::Committed, String::new());
            self.deliver_loopback(now);
            return Ok(Some(Outcome::Committed));
        }
        let participants = coord.participant_list();
        for p in &participants {
            self.send(
                Dest::Agent(p.clone()),
                Msg::Prepare {
                    txn,
                    participants: participants.clone(),
                },
            );
        }
        self.arm(txn, now + self.cfg.takeover_after_ms);
        Ok(None)
    }

    /// Abort before the decision. An open transaction aborts at once; one that is voting
    /// is settled through a higher ballot that proposes Aborted where nothing was accepted
    /// (so the answer may still be Committed if every vote was already chosen Prepared).
    pub fn abort(&mut self, now: u64, txn: TxnId) -> Result<Option<Outcome>, TxnError> {
        if let Some(outcome) = self.known_decision(txn) {
            return Ok(Some(outcome));
        }
        match self.coordination.get(&txn).map(|c| c.phase) {
            Some(Phase::Open) => {
                self.decide(now, txn, Outcome::Aborted, "aborted by the client".into());
                Ok(Some(Outcome::Aborted))
            }
            _ => self.resolve(now, txn, None, &[]),
        }
    }

    /// An in-doubt participant (or an operator) asks for the outcome. If it is not known
    /// here, this replica takes the transaction over with a higher ballot.
    pub fn resolve(
        &mut self,
        now: u64,
        txn: TxnId,
        participant: Option<&str>,
        participants: &[Participant],
    ) -> Result<Option<Outcome>, TxnError> {
        if let Some(outcome) = self.known_decision(txn) {
            if let Some(c) = self.coordination.get_mut(&txn) {
                c.learn_participants(participants);
            }
            self.push_decision(now, txn);
            return Ok(Some(outcome));
        }
        let known = self.acceptor.contains_key(&txn) || self.coordination.contains_key(&txn);
        if !known && participant.is_none() && participants.is_empty() {
            return Err(TxnError::Unknown {
                txn,
                expired: self.expired.set.contains(&txn),
            });
        }
        if self
            .coordination
            .get(&txn)
            .is_some_and(|c| c.phase == Phase::Open)
        {
            // Nothing was asked to prepare yet; the leader may abort on its own.
            self.decide(now, txn, Outcome::Aborted, "abandoned before commit".into());
            return Ok(Some(Outcome::Aborted));
        }
        let coord = self.takeover_state(now, txn);
        coord.learn_participants(participants);
        if let Some(p) = participant {
            coord.instances_hint.insert(p.to_string());
        }
        let in_phase1 = coord.promises.is_some();
        if !in_phase1 {
            self.start_phase1(now, txn);
            // This replica's own 1a (and, with one replica, the whole round) is loopback.
            self.deliver_loopback(now);
        }
        Ok(self.known_decision(txn))
    }

    /// A participant confirmed it applied the decision.
    pub fn on_applied(&mut self, now: u64, txn: TxnId, participant: &str) {
        if let Some(coord) = self.coordination.get_mut(&txn) {
            if matches!(coord.phase, Phase::Decided(_)) {
                coord.applied.insert(participant.to_string());
                self.check_finished(now, txn);
            }
        }
    }

    /// Once every participant applied the decision: answer waiting clients, tell the other
    /// replicas (so that they stop watching and retire it), and keep it for the retention window.
    fn check_finished(&mut self, now: u64, txn: TxnId) {
        let replicas = self.cfg.replicas;
        let Some(coord) = self.coordination.get_mut(&txn) else {
            return;
        };
        let Phase::Decided(outcome) = coord.phase else {
            return;
        };
        if coord.finished || !coord.all_applied() {
            return;
        }
        coord.finished = true;
        let tell_replicas = !coord.local_only;
        self.out.push(Output::Finished { txn, outcome });
        if tell_replicas {
            for r in 0..replicas {
                self.send_replica(r, Msg::Finished { txn, outcome });
            }
            self.deliver_loopback(now);
        }
        self.arm(txn, now + self.cfg.retention_ms);
    }

    // ------------------------------------------------------------------ messages

    /// A message from another replica or an agent (`from` is the sending replica; for an
    /// agent's phase 2a it is ignored).
    pub fn on_message(&mut self, now: u64, from: ReplicaId, msg: Msg) {
        self.handle(now, from, msg);
        self.deliver_loopback(now);
    }

    fn deliver_loopback(&mut self, now: u64) {
        while let Some(msg) = self.loopback.pop_front() {
            self.handle(now, self.cfg.id, msg);
        }
    }

    fn handle(&mut self, now: u64, from: ReplicaId, msg: Msg) {
        if self.expired.set.contains(&msg.txn()) {
            // A late duplicate about a transaction finished and retired long ago: answering it
            // would restart the protocol on a blank slate.
            return;
        }
        match msg {
            Msg::Phase1a {
                txn,
                ballot,
                participants,
            } => {
                let acc = self.acceptor_entry(now, txn);
                let reply = acc.on_phase1a(txn, ballot, &participants);
                self.acceptor_reply(txn, ballot, from, reply);
            }
            Msg::Phase2a {
                txn,
                participant,
                ballot,
                vote,
                participants,
            } => {
                if ballot == 0 && vote == Vote::Prepared && participants.is_empty() {
                    // Every Prepared acceptance must carry R: a chosen Prepared without it
                    // can neither commit (R unknown) nor abort once the leader is gone.
                    return;
                }
                let acc = self.acceptor_entry(now, txn);
                let reply = acc.on_phase2a(txn, &participant, ballot, vote, &participants);
                let to = if ballot == 0 {
                    txn.leader()
                } else {
                    ballot_owner(ballot, self.cfg.replicas)
                };
                self.acceptor_reply(txn, ballot, to, reply);
            }
            Msg::Phase1b {
                txn,
                ballot,
                accepted,
                participants,
            } => self.on_phase1b(now, from, txn, ballot, accepted, participants),
            Msg::Phase2b {
                txn,
                participant,
                ballot,
                vote,
            } => self.on_phase2b(now, from, txn, &participant, ballot, vote),
            Msg::Nack {
                txn,
                ballot,
                promised,
            } => self.on_nack(now, txn, ballot, promised),
            Msg::Decided {
                txn,
                outcome,
                participants,
            } => self.learn_decision(now, txn, outcome, &participants),
            Msg::Finished { txn, outcome } => {
                let retention = self.cfg.retention_ms;
                let acc = self.acceptor_entry(now, txn);
                if !acc.finished {
                    acc.finished = true;
                    acc.decided = Some(outcome);
                    self.out
                        .push(Output::PersistLazy(Record::Finished { txn, outcome }));
                }
                if let Some(c) = self.coordination.get_mut(&txn) {
                    if !c.finished {
                        // Another replica finished it: answer anyone waiting here too.
                        if !matches!(c.phase, Phase::Decided(_)) {
                            self.out.push(Output::Decided {
                                txn,
                                outcome,
                                reason: String::new(),
                            });
                        }
                        c.settle(outcome);
                        c.finished = true;
                        c.applied.extend(c.participants.keys().cloned());
                        self.out.push(Output::Finished { txn, outcome });
                    }
                }
                self.arm(txn, now + retention);
            }
            // Agents' messages; a replica never receives them.
            Msg::Prepare { .. } | Msg::Decide { .. } => {}
        }
    }

    fn acceptor_reply(&mut self, txn: TxnId, ballot: Ballot, to: ReplicaId, reply: Reply) {
        match reply {
            Reply::Accept { record, msg } => {
                if let Some(record) = record {
                    self.out.push(Output::Persist(record));
                }
                self.send_replica(to, msg);
            }
            Reply::Reject { promised } => {
                if ballot > 0 {
                    self.send_replica(
                        to,
                        Msg::Nack {
                            txn,
                            ballot,
                            promised,
                        },
                    );
                }
            }
        }
    }

    fn on_phase1b(
        &mut self,
        now: u64,
        from: ReplicaId,
        txn: TxnId,
        ballot: Ballot,
        accepted: Vec<(String, Ballot, Vote)>,
        participants: Vec<Participant>,
    ) {
        let replicas = self.cfg.replicas;
        let Some(coord) = self.coordination.get_mut(&txn) else {
            return;
        };
        if coord.ballot != ballot || matches!(coord.phase, Phase::Decided(_)) {
            return;
        }
        let Some(promises) = coord.promises.as_mut() else {
            return;
        };
        promises.insert(from, accepted);
        let promised = promises.len();
        coord.learn_participants(&participants);
        if promised < majority(replicas) {
            return;
        }
        // A majority promised: propose, per instance, the value accepted in the highest
        // ballot, and Aborted where none was accepted.
        let mut best: BTreeMap<String, (Ballot, Vote)> = BTreeMap::new();
        for (p, b, v) in coord.promises.iter().flat_map(|m| m.values()).flatten() {
            if best.get(p).is_none_or(|(bb, _)| b > bb) {
                best.insert(p.clone(), (*b, *v));
            }
        }
        coord.promises = None;
        let instances = coord.instances();
        let participant_list = coord.participant_list();
        if instances.is_empty() {
            // A majority knows neither the participants nor any vote: there is nothing this
            // replica can decide, and retrying would only repeat this round. Stand down; an
            // in-doubt participant that names its instance starts a useful round.
            self.coordination.remove(&txn);
            self.disarm(txn);
            return;
        }
        for p in instances {
            let vote = best.get(&p).map_or(Vote::Aborted, |(_, v)| *v);
            for r in 0..replicas {
                self.send_replica(
                    r,
                    Msg::Phase2a {
                        txn,
                        participant: p.clone(),
                        ballot,
                        vote,
                        participants: participant_list.clone(),
                    },
                );
            }
        }
        let _ = now;
    }

    fn on_phase2b(
        &mut self,
        now: u64,
        from: ReplicaId,
        txn: TxnId,
        participant: &str,
        ballot: Ballot,
        vote: Vote,
    ) {
        let replicas = self.cfg.replicas;
        let Some(coord) = self.coordination.get_mut(&txn) else {
            return;
        };
        if matches!(coord.phase, Phase::Decided(_) | Phase::Open) {
            return;
        }
        if !coord.tally_2b(from, participant, ballot, vote, replicas) {
            return;
        }
        if let Some((outcome, reason)) = coord.decision() {
            self.decide(now, txn, outcome, reason);
        }
    }

    fn on_nack(&mut self, now: u64, txn: TxnId, ballot: Ballot, promised: Ballot) {
        self.round = self.round.max(promised / u64::from(self.cfg.replicas));
        let Some(coord) = self.coordination.get_mut(&txn) else {
            return;
        };
        if coord.ballot != ballot || matches!(coord.phase, Phase::Decided(_)) {
            return;
        }
        // Another proposer is ahead: back off for a random while rather than duel. The
        // ballot is abandoned, so that a duplicate Nack (or another acceptor's) for it does not
        // restart the back-off.
        coord.promises = None;
        coord.ballot = 0;
        let delay = self.backoff();
        self.arm(txn, now + delay);
    }

    // ------------------------------------------------------------------ timers

    /// Fires every timer due at `now`.
    pub fn on_tick(&mut self, now: u64) {
        while let Some(&(at, txn)) = self.timer_index.iter().next() {
            if at > now {
                break;
            }
            self.timer_index.remove(&(at, txn));
            self.timers.remove(&txn);
            self.on_timer(now, txn);
        }
    }

    /// The single timer of `txn` fired; what it means depends on the transaction's state.
    pub fn on_timer(&mut self, now: u64, txn: TxnId) {
        self.disarm(txn);
        let acc_finished = self.acceptor.get(&txn).is_some_and(|a| a.finished);
        let coord_phase = self.coordination.get(&txn).map(|c| c.phase);
        let all_applied = self
            .coordination
            .get(&txn)
            .is_some_and(|c| c.participants.keys().all(|p| c.applied.contains(p)));
        match coord_phase {
            Some(Phase::Open) => {
                self.decide(now, txn, Outcome::Aborted, "open past its deadline".into());
            }
            Some(Phase::Decided(_)) if all_applied || acc_finished => self.forget(txn),
            _ if acc_finished => self.forget(txn),
            _ => {
                if self.known_decision(txn).is_some() {
                    self.push_decision(now, txn);
                } else {
                    self.takeover_state(now, txn);
                    self.start_phase1(now, txn);
                }
            }
        }
        self.deliver_loopback(now);
    }

    fn arm(&mut self, txn: TxnId, at: u64) {
        self.disarm(txn);
        self.timers.insert(txn, at);
        self.timer_index.insert((at, txn));
    }

    fn disarm(&mut self, txn: TxnId) {
        if let Some(at) = self.timers.remove(&txn) {
            self.timer_index.remove(&(at, txn));
        }
    }

    fn forget(&mut self, txn: TxnId) {
        self.acceptor.remove(&txn);
        self.coordination.remove(&txn);
        self.disarm(txn);
        self.expired.insert(txn);
    }

    // ------------------------------------------------------------------ proposer

    fn takeover_state(&mut self, now: u64, txn: TxnId) -> &mut Coordination {
        let acc = self.acceptor.get(&txn).cloned();
        let coord = self
            .coordination
            .entry(txn)
            .or_insert_with(|| Coordination::new(Phase::Voting, now));
        if let Some(acc) = acc {
            coord.learn_participants(&acc.participants);
            coord.instances_hint.extend(acc.accepted.keys().cloned());
        }
        coord
    }

    /// Phase 1 with a fresh ballot of this replica over every instance of `txn`.
    fn start_phase1(&mut self, now: u64, txn: TxnId) {
        let seen = self.acceptor.get(&txn).map_or(0, |a| a.promised);
        self.round = self.round.max(seen / u64::from(self.cfg.replicas)) + 1;
        let ballot = ballot_of(self.round, self.cfg.id, self.cfg.replicas);
        self.out
            .push(Output::Persist(Record::Round { round: self.round }));
        let replicas = self.cfg.replicas;
        let Some(coord) = self.coordination.get_mut(&txn) else {
            return;
        };
        coord.ballot = ballot;
        coord.promises = Some(BTreeMap::new());
        let participants = coord.participant_list();
        for r in 0..replicas {
            self.send_replica(
                r,
                Msg::Phase1a {
                    txn,
                    ballot,
                    participants: participants.clone(),
                },
            );
        }
        let delay = self.cfg.takeover_after_ms / 2 + self.backoff();
        self.arm(txn, now + delay);
    }

    fn decide(&mut self, now: u64, txn: TxnId, outcome: Outcome, reason: String) {
        let replicas = self.cfg.replicas;
        let Some(coord) = self.coordination.get_mut(&txn) else {
            return;
        };
        if matches!(coord.phase, Phase::Decided(_)) {
            return;
        }
        let was_open = coord.phase == Phase::Open;
        coord.local_only = was_open;
        coord.settle(outcome);
        coord.reason = reason.clone();
        let participants = coord.participant_list();
        self.out.push(Output::Decided {
            txn,
            outcome,
            reason,
        });
        if !was_open {
            // Only a transaction that reached the acceptors needs them to learn it.
            for r in 0..replicas {
                self.send_replica(
                    r,
                    Msg::Decided {
                        txn,
                        outcome,
                        participants: participants.clone(),
                    },
                );
            }
        }
        self.push_decision(now, txn);
    }

    /// Sends the decision to every participant that has not confirmed it, and re-arms.
    fn push_decision(&mut self, now: u64, txn: TxnId) {
        let Some(outcome) = self.known_decision(txn) else {
            return;
        };
        let acc_participants = self
            .acceptor
            .get(&txn)
            .map(|a| a.participants.clone())
            .unwrap_or_default();
        let coord = self
            .coordination
            .entry(txn)
            .or_insert_with(|| Coordination::new(Phase::Decided(outcome), now));
        coord.settle(outcome);
        coord.learn_participants(&acc_participants);
        let pending: Vec<Participant> = coord
            .participants
            .values()
            .filter(|p| !coord.applied.contains(&p.id))
            .cloned()
            .collect();
        if pending.is_empty() {
            if coord.participants.is_empty() {
                // R unknown or empty: nothing to finish; keep the answer for retention.
                self.arm(txn, now + self.cfg.retention_ms);
            } else {
                self.check_finished(now, txn);
            }
            return;
        }
        for p in pending {
            self.send(Dest::Agent(p), Msg::Decide { txn, outcome });
        }
        self.arm(txn, now + self.cfg.resend_after_ms);
    }

    fn learn_decision(
        &mut self,
        now: u64,
        txn: TxnId,
        outcome: Outcome,
        participants: &[Participant],
    ) {
        let acc = self.acceptor_entry(now, txn);
        let participants_known = !acc.participants.is_empty();
        if !participants_known {
            acc.participants = participants.to_vec();
        }
        let mut learned = acc.decided.is_none();
        if learned {
            acc.decided = Some(outcome);
            self.out.push(Output::PersistLazy(Record::Decided {
                txn,
                outcome,
                participants: participants.to_vec(),
            }));
        }
        let mut decided_here = false;
        if let Some(coord) = self.coordination.get_mut(&txn) {
            coord.learn_participants(participants);
            decided_here = matches!(coord.phase, Phase::Decided(_));
            if !decided_here {
                learned = true;
                coord.settle(outcome);
                self.out.push(Output::Decided {
                    txn,
                    outcome,
                    reason: String::new(),
                });
            }
        }
        if learned && !decided_here && !self.acceptor.get(&txn).is_some_and(|a| a.finished) {
            // Someone else decided; if it does not finish the job, this replica will. (Only
            // the first time: a duplicate Decided must not keep postponing that.)
            let delay = self.cfg.takeover_after_ms + self.backoff();
            self.arm(txn, now + delay);
        }
    }

    fn known_decision(&self, txn: TxnId) -> Option<Outcome> {
        if let Some(Phase::Decided(o)) = self.coordination.get(&txn).map(|c| c.phase) {
            return Some(o);
        }
        self.acceptor.get(&txn).and_then(|a| a.decided)
    }

    fn led(&mut self, txn: TxnId) -> Result<&mut Coordination, TxnError> {
        if txn.leader() != self.cfg.id {
            return Err(TxnError::NotLeader {
                txn,
                leader: txn.leader(),
            });
        }
        let expired = self.expired.set.contains(&txn);
        self.coordination
            .get_mut(&txn)
            .ok_or(TxnError::Unknown { txn, expired })
    }

    fn acceptor_entry(&mut self, now: u64, txn: TxnId) -> &mut AcceptorTxn {
        if !self.acceptor.contains_key(&txn) && !self.timers.contains_key(&txn) {
            // A transaction this replica did not lead: watch it, and take it over if its
            // leader stays silent. Jitter keeps replicas from starting together.
            let delay = self.cfg.takeover_after_ms + self.backoff();
            self.arm(txn, now + delay);
        }
        self.acceptor.entry(txn).or_insert_with(|| AcceptorTxn {
            since: now,
            ..AcceptorTxn::default()
        })
    }

    fn send_replica(&mut self, to: ReplicaId, msg: Msg) {
        if to == self.cfg.id {
            self.loopback.push_back(msg);
        } else {
            self.send(Dest::Replica(to), msg);
        }
    }

    fn send(&mut self, to: Dest, msg: Msg) {
        self.out.push(Output::Send { to, msg });
    }

    fn next_random(&mut self) -> u64 {
        // xorshift64*: deterministic for a seed, good enough to spread back-offs.
        let mut x = self.rng;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.rng = x;
        x.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn backoff(&mut self) -> u64 {
        let span = self.cfg.takeover_after_ms.max(1);
        self.next_random() % span
    }

    // ------------------------------------------------------------------ queries

    pub fn status(&self, txn: TxnId) -> LocalStatus {
        let acc = self.acceptor.get(&txn);
        let coord = self.coordination.get(&txn);
        let mut participants = coord.map(|c| c.participant_list()).unwrap_or_default();
        if participants.is_empty() {
            participants = acc.map(|a| a.participants.clone()).unwrap_or_default();
        }
        LocalStatus {
            known: acc.is_some() || coord.is_some(),
            expired: self.expired.set.contains(&txn),
            decided: self.known_decision(txn),
            open: coord.is_some_and(|c| c.phase == Phase::Open),
            participants,
            promised: acc.map_or(0, |a| a.promised),
            accepted: acc.map(|a| a.accepted.clone()).unwrap_or_default(),
            applied: coord.map(|c| c.applied.clone()).unwrap_or_default(),
            finished: acc.is_some_and(|a| a.finished),
            since: acc.map(|a| a.since).or(coord.map(|c| c.since)),
        }
    }

    /// Hashes everything that decides this replica's future behaviour except timer deadlines
    /// and the back-off generator (which only move deadlines). For model checkers, where any
    /// armed timer may fire at any moment: replicas equal under this hash behave alike.
    #[doc(hidden)]
    pub fn hash_protocol_state<H: std::hash::Hasher>(&self, h: &mut H) {
        use std::hash::Hash;
        self.cfg.hash(h);
        self.round.hash(h);
        self.acceptor.hash(h);
        self.coordination.hash(h);
        for txn in self.timers.keys() {
            txn.hash(h);
        }
        self.expired.hash(h);
        self.loopback.hash(h);
        self.out.hash(h);
    }

    /// Reason recorded with the decision, when this replica decided it.
    pub fn reason(&self, txn: TxnId) -> Option<&str> {
        self.coordination
            .get(&txn)
            .map(|c| c.reason.as_str())
            .filter(|r| !r.is_empty())
    }

    pub fn stats(&self) -> Stats {
        let mut stats = Stats {
            leading: self
                .coordination
                .iter()
                .filter(|(t, c)| t.leader() == self.cfg.id && !matches!(c.phase, Phase::Decided(_)))
                .count(),
            ..Stats::default()
        };
        for (txn, acc) in &self.acceptor {
            if acc.decided.is_some() {
                stats.decided_retained += 1;
            } else {
                stats.undecided += 1;
                if stats
                    .oldest_undecided
                    .is_none_or(|(_, since)| acc.since < since)
                {
                    stats.oldest_undecided = Some((*txn, acc.since));
                }
            }
        }
        stats
    }
}

fn record_txn(record: &Record) -> Option<TxnId> {
    match record {
        Record::Promise { txn, .. }
        | Record::Accept { txn, .. }
        | Record::Decided { txn, .. }
        | Record::Finished { txn, .. } => Some(*txn),
        Record::Round { .. } => None,
    }
}
