//! One coordinator replica as a deterministic state machine: the acceptor of every
//! transaction, the leader of those begun on it, and the proposer that takes over those whose
//! leader went silent.
//!
//! Inputs are method calls carrying `now` (milliseconds of the shell's monotonic clock); the
//! outputs queue up in order and are taken with [`Replica::drain`]. Randomness (takeover
//! back-off) comes from a seed. The same code runs in the server, the unit tests and the
//! stateright model.

use crate::acceptor::{AcceptorTxn, Reply};
use crate::admission::{Admission, JoinAnswer, JoinMode};
use crate::coordination::{AbortCause, Coordination, Phase};
use crate::msg::{Dest, Msg, Output, Record};
use crate::types::{
    ballot_in_range, ballot_of, ballot_owner, majority, max_round, Ballot, Outcome, Participant,
    ReplicaId, TxnId, Vote, MAX_PARTICIPANTS,
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
    /// This replica rejoined after losing its log and takes no part in a transaction that
    /// may be older than that: another replica must settle it.
    Abstains { txn: TxnId },
    /// The transaction is led by another replica.
    NotLeader { txn: TxnId, leader: ReplicaId },
    /// Enlisting after the participant set was frozen.
    Frozen { txn: TxnId },
    /// A participant id already enlisted from another agent address.
    DuplicateParticipant {
        txn: TxnId,
        participant: String,
        enlisted: String,
    },
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
            TxnError::Abstains { txn } => write!(
                f,
                "this replica rejoined after losing its acceptor log and takes no part in \
                 transaction {txn}, which may have begun before; ask another replica"
            ),
            TxnError::Frozen { txn } => write!(
                f,
                "transaction {txn} is committing or decided: no new participant may join"
            ),
            TxnError::DuplicateParticipant {
                txn,
                participant,
                enlisted,
            } => write!(
                f,
                "participant {participant} already joined transaction {txn} from the agent at \
                 {enlisted}: two agents must never answer for one participant"
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
    /// Runs under `Record::Rejoined` (answers only for its own new transactions).
    pub rejoined: bool,
    /// Every peer admitted it (see [`crate::admission`]); until then it answers for nothing.
    pub admitted: bool,
    pub incarnation: Option<u64>,
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
    /// Under `Record::Rejoined`: see [`Replica::answers_for`].
    rejoined: bool,
    /// Its incarnation, the peers' fences, and whether it may act yet.
    admission: Admission,
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
            rejoined: false,
            admission: Admission::admitted(),
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
        replica.admission = Admission::default();
        for record in records {
            if replica.admission.replay(record) {
                continue;
            }
            match record {
                Record::Round { round } => {
                    // Clamped: a round beyond any ballot in range can only come from a
                    // corrupt log, and `round + 1` must never overflow.
                    let round = (*round).min(max_round(replica.cfg.replicas));
                    replica.round = replica.round.max(round);
                }
                Record::Rejoined => replica.rejoined = true,
                other => {
                    if let Some(txn) = record_txn(other) {
                        let entry = replica.acceptor.entry(txn).or_default();
                        entry.since = now;
                        entry.apply(other);
                    }
                }
            }
        }
        replica.admission.finish_replay();
        replica.arm_idle(now);
        replica
    }

    /// Arms a timer for every known transaction that has none: a takeover for an undecided
    /// one, forgetting for a finished one.
    fn arm_idle(&mut self, now: u64) {
        let idle: Vec<(TxnId, bool)> = self
            .acceptor
            .iter()
            .filter(|(txn, _)| !self.timers.contains_key(txn))
            .map(|(txn, acc)| (*txn, acc.finished))
            .collect();
        for (txn, finished) in idle {
            let after = if finished {
                self.cfg.retention_ms
            } else {
                self.cfg.takeover_after_ms
            };
            self.arm(txn, now.saturating_add(after));
        }
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
        if self.rejoined {
            out.insert(0, Record::Rejoined);
        }
        let mut admission = Vec::new();
        self.admission.records(&mut admission);
        out.splice(0..0, admission);
        for (txn, acc) in &self.acceptor {
            acc.records(*txn, &mut out);
        }
        out
    }

    // ------------------------------------------------------------------ client requests

    /// Starts a transaction led by this replica. `nonce` is the shell's randomness.
    pub fn begin(&mut self, now: u64, nonce: u64) -> TxnId {
        self.begin_for(now, nonce, 0)
    }

    /// [`Replica::begin`] with the client's own deadline to reach Commit: `open_for_ms`
    /// shortens the configured open timeout (0: the configured one); it never extends it,
    /// since that bound is the operator's (how long row locks may be held).
    pub fn begin_for(&mut self, now: u64, nonce: u64, open_for_ms: u64) -> TxnId {
        let open_for = match open_for_ms {
            0 => self.cfg.open_timeout_ms,
            ms => ms.min(self.cfg.open_timeout_ms),
        };
        let mut txn = TxnId::new(self.cfg.id, nonce);
        while self.coordination.contains_key(&txn) || self.acceptor.contains_key(&txn) {
            txn = TxnId::new(self.cfg.id, self.next_random());
        }
        self.coordination
            .insert(txn, Coordination::new(Phase::Open, now));
        self.arm(txn, now.saturating_add(open_for));
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
        match coord.participants.get(&participant.id) {
            // Two agents answering for one participant id: Prepare would reach only the
            // first, and the second one's branch would never be prepared or counted.
            Some(known) if known.address != participant.address => {
                Err(TxnError::DuplicateParticipant {
                    txn,
                    participant: participant.id,
                    enlisted: known.address.clone(),
                })
            }
            Some(_) => Ok(()),
            None => {
                coord
                    .participants
                    .insert(participant.id.clone(), participant);
                Ok(())
            }
        }
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
            // Nothing to prepare: a transaction that touched no database commits trivially,
            // and nothing is left to apply, so it is finished too: a Commit waiting for the
            // participants' confirmations must not wait for ones that never come.
            self.decide(now, txn, Outcome::Committed, None);
            self.check_finished(now, txn);
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
        self.arm(txn, now.saturating_add(self.cfg.takeover_after_ms));
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
                self.decide(now, txn, Outcome::Aborted, Some(AbortCause::Client));
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
            self.push_decision(now, txn);
            return Ok(Some(outcome));
        }
        if txn.leader() >= self.cfg.replicas {
            // No replica of this group minted it, and every replica drops messages about it
            // (see `well_formed`): a phase 1 for it could only retry forever.
            return Err(TxnError::Unknown {
                txn,
                expired: false,
            });
        }
        if !self.answers_for(txn) {
            // A takeover here could reuse a ballot this replica used before it lost its log.
            return Err(TxnError::Abstains { txn });
        }
        if self.expired.set.contains(&txn) {
            // Decided, finished (or never told R) and retired after the retention window: the
            // outcome is gone from here, and a fresh phase 1 could not bring it back. Worse,
            // its own phase 1a would be dropped as a late duplicate (see `handle`), so it
            // would retry forever, persisting a new round each time.
            return Err(TxnError::Unknown { txn, expired: true });
        }
        // The R a caller supplies is never learned as R: it only names instances to ask
        // about. A takeover decides over the R the acceptors report in phase 1 (the one the
        // leader froze and every vote carries), or, when no acceptor of its quorum knows R
        // (then no value can have been chosen), aborts the instances it was asked about.
        // Taken as R, a caller's short list would let a takeover commit a subset of a
        // transaction whose leader aborted it.
        let hinted: Vec<String> = participants
            .iter()
            .take(MAX_PARTICIPANTS)
            .map(|p| p.id.clone())
            .collect();
        let known = self.acceptor.contains_key(&txn) || self.coordination.contains_key(&txn);
        if !known && participant.is_none() && hinted.is_empty() {
            return Err(TxnError::Unknown {
                txn,
                expired: false,
            });
        }
        if self
            .coordination
            .get(&txn)
            .is_some_and(|c| c.phase == Phase::Open)
        {
            // Nothing was asked to prepare yet; the leader may abort on its own.
            self.decide(now, txn, Outcome::Aborted, Some(AbortCause::Abandoned));
            return Ok(Some(Outcome::Aborted));
        }
        let coord = self.takeover_state(now, txn);
        coord.instances_hint.extend(hinted);
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
        self.arm(txn, now.saturating_add(self.cfg.retention_ms));
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

    /// Whether `msg` is one an honest replica or participant of this group could have sent:
    /// every ballot in range, replica-only messages from a replica of the group, phase 1 and
    /// ballots above 0 only from the replica that owns the ballot, and ballot-0 votes that
    /// carry R. Anything else is dropped before it touches any state: the core is fed by the
    /// network (through the shells' conversions, which already refuse most of it), by tests
    /// and by the model checker, and must stay safe and panic-free whatever arrives.
    fn well_formed(&self, from: ReplicaId, msg: &Msg) -> bool {
        let replicas = self.cfg.replicas;
        let replica = from < replicas;
        let owns = |ballot: Ballot| ballot > 0 && replica && ballot_owner(ballot, replicas) == from;
        // Transaction ids are minted by a replica of this group and name it.
        msg.txn().leader() < replicas
            && match msg {
                Msg::Phase1a { ballot, .. } => ballot_in_range(*ballot) && owns(*ballot),
                Msg::Phase1b {
                    ballot, accepted, ..
                } => {
                    replica
                        && *ballot > 0
                        && ballot_in_range(*ballot)
                        && accepted.iter().all(|(_, b, _)| ballot_in_range(*b))
                }
                Msg::Phase2a {
                    participant,
                    ballot: 0,
                    participants,
                    ..
                } => {
                    // The participant's own vote (`from` names no replica). It always carries
                    // R: a chosen value whose R is unknown can neither commit nor abort once
                    // the leader is gone, and only R tells the acceptor which instances exist.
                    !participant.is_empty() && participants.iter().any(|p| p.id == *participant)
                }
                Msg::Phase2a {
                    participant,
                    ballot,
                    ..
                } => !participant.is_empty() && ballot_in_range(*ballot) && owns(*ballot),
                Msg::Phase2b { ballot, .. } => replica && ballot_in_range(*ballot),
                Msg::Nack {
                    ballot, promised, ..
                } => replica && *ballot > 0 && ballot_in_range(*promised) && ballot < promised,
                Msg::Decided { .. } | Msg::Finished { .. } => replica,
                Msg::Prepare { .. } | Msg::Decide { .. } => false,
            }
    }

    fn handle(&mut self, now: u64, from: ReplicaId, msg: Msg) {
        if !self.well_formed(from, &msg) {
            return;
        }
        if self.expired.set.contains(&msg.txn()) {
            // A late duplicate about a transaction finished and retired long ago: answering it
            // would restart the protocol on a blank slate.
            return;
        }
        if matches!(msg, Msg::Phase1a { .. } | Msg::Phase2a { .. }) && !self.answers_for(msg.txn())
        {
            // Silence, as from a replica that is down: the others settle it.
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
                // (A ballot-0 vote without R was refused by `well_formed`.)
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
                                cause: None,
                            });
                        }
                        c.settle(outcome);
                        c.finished = true;
                        c.applied.extend(c.participants.keys().cloned());
                        self.out.push(Output::Finished { txn, outcome });
                    }
                }
                self.arm(txn, now.saturating_add(retention));
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
            Reply::Ignore => {}
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
        if let Some((outcome, cause)) = coord.decision() {
            self.decide(now, txn, outcome, cause);
        }
    }

    fn on_nack(&mut self, now: u64, txn: TxnId, ballot: Ballot, promised: Ballot) {
        // `promised` is in range (`well_formed`), so this round is too; clamped all the same,
        // since the next phase 1 adds one to it.
        let seen = promised / u64::from(self.cfg.replicas.max(1));
        self.round = self.round.max(seen.min(max_round(self.cfg.replicas)));
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
        self.arm(txn, now.saturating_add(delay));
    }

    // ------------------------------------------------------------------ timers

    /// Fires every timer due at `now`.
    ///
    /// Only the timers due when the tick began: one that fires and re-arms at or before `now`
    /// (a zero timeout, or a deadline saturated at u64::MAX) waits for the next tick instead
    /// of spinning here forever.
    pub fn on_tick(&mut self, now: u64) {
        let due: Vec<(u64, TxnId)> = self
            .timer_index
            .iter()
            .take_while(|(at, _)| *at <= now)
            .copied()
            .collect();
        for (at, txn) in due {
            if self.timers.get(&txn) != Some(&at) {
                continue; // disarmed or moved by a timer that fired before it
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
                self.decide(now, txn, Outcome::Aborted, Some(AbortCause::OpenTimeout));
            }
            Some(Phase::Decided(_)) if all_applied || acc_finished => self.forget(txn),
            _ if acc_finished => self.forget(txn),
            _ => {
                if self.known_decision(txn).is_some() {
                    self.push_decision(now, txn);
                } else if self.answers_for(txn) {
                    self.takeover_state(now, txn);
                    self.start_phase1(now, txn);
                }
            }
        }
        self.deliver_loopback(now);
    }

    /// Deadlines saturate (`now.saturating_add`): the shell's clock is far from u64::MAX, but
    /// a deadline must never wrap to the past and fire at once.
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
        let replicas = self.cfg.replicas;
        let seen = self.acceptor.get(&txn).map_or(0, |a| a.promised);
        let floor = self.round.max(seen / u64::from(replicas.max(1)));
        let next = floor
            .checked_add(1)
            .and_then(|round| Some((round, ballot_of(round, self.cfg.id, replicas)?)));
        let Some((round, ballot)) = next else {
            // No ballot of this replica is left above what the acceptors promised. Only a
            // promise near MAX_BALLOT does that, which no honest proposer makes (see
            // `MAX_BALLOT`); wrapping around would reuse ballots. Stand down: the round is
            // not spent, no timer is armed, and the decision may still be learned from others.
            if let Some(coord) = self.coordination.get_mut(&txn) {
                coord.promises = None;
                coord.ballot = 0;
            }
            self.disarm(txn);
            return;
        };
        self.round = round;
        self.out
            .push(Output::Persist(Record::Round { round: self.round }));
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
        self.arm(txn, now.saturating_add(delay));
    }

    fn decide(&mut self, now: u64, txn: TxnId, outcome: Outcome, cause: Option<AbortCause>) {
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
        coord.cause = cause.clone();
        let participants = coord.participant_list();
        self.out.push(Output::Decided {
            txn,
            outcome,
            cause,
        });
        if was_open {
            // No acceptor heard of an open transaction, so only this replica knows it aborted:
            // durable here (before the client hears of it), so that GetStatus keeps saying
            // "aborted" across a restart for the whole retention window.
            let acc = self.acceptor_entry(now, txn);
            acc.decided = Some(outcome);
            if acc.participants.is_empty() {
                acc.participants = participants.clone();
            }
            self.out.push(Output::Persist(Record::Decided {
                txn,
                outcome,
                participants: participants.clone(),
            }));
        } else {
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
                self.arm(txn, now.saturating_add(self.cfg.retention_ms));
            } else {
                self.check_finished(now, txn);
            }
            return;
        }
        for p in pending {
            self.send(Dest::Agent(p), Msg::Decide { txn, outcome });
        }
        self.arm(txn, now.saturating_add(self.cfg.resend_after_ms));
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
                    cause: None,
                });
            }
        }
        if learned && !decided_here && !self.acceptor.get(&txn).is_some_and(|a| a.finished) {
            // Someone else decided; if it does not finish the job, this replica will. (Only
            // the first time: a duplicate Decided must not keep postponing that.)
            let delay = self.cfg.takeover_after_ms + self.backoff();
            self.arm(txn, now.saturating_add(delay));
        }
    }

    fn known_decision(&self, txn: TxnId) -> Option<Outcome> {
        if let Some(Phase::Decided(o)) = self.coordination.get(&txn).map(|c| c.phase) {
            return Some(o);
        }
        self.acceptor.get(&txn).and_then(|a| a.decided)
    }

    /// Whether this replica's acceptor and proposer take part in `txn`. Always, unless it
    /// rejoined after losing its log: then it may have promised a ballot or accepted a vote in
    /// any transaction begun before, and answering again (a ballot-0 vote below a forgotten
    /// promise, a takeover reusing a forgotten ballot) could let two values be chosen. So it
    /// answers only for transactions it began since (coordinated here) or already answered
    /// for since (its post-rejoin log holds a promise or an acceptance); every other is
    /// left to the other replicas, as if this one were down.
    pub fn answers_for(&self, txn: TxnId) -> bool {
        if !self.admission.is_admitted() {
            // Not yet admitted by every peer: it may be a lost log claiming to be new.
            return false;
        }
        !self.rejoined
            || (txn.leader() == self.cfg.id && self.coordination.contains_key(&txn))
            || self
                .acceptor
                .get(&txn)
                .is_some_and(|a| a.promised > 0 || !a.accepted.is_empty())
    }

    // ------------------------------------------------------------------ admission

    /// Whether every peer has admitted this replica (see [`crate::admission`]). Until then
    /// the shell refuses Begin and the core answers for no transaction.
    pub fn is_admitted(&self) -> bool {
        self.admission.is_admitted()
    }

    /// This life's incarnation; `None` only for a log from before incarnations.
    pub fn incarnation(&self) -> Option<u64> {
        self.admission.incarnation()
    }

    /// The incarnation of peer `from` admitted here, if any.
    pub fn fence(&self, from: ReplicaId) -> Option<u64> {
        self.admission.fences().get(&from).copied()
    }

    /// Peer `from` (as its certificate says) asks to be admitted as `incarnation`. The
    /// answer may leave only once the outputs of this step are durable.
    pub fn on_join(&mut self, from: ReplicaId, incarnation: u64, mode: JoinMode) -> JoinAnswer {
        let (answer, record) = self.admission.on_join(from, incarnation, mode);
        self.out.extend(record.map(Output::Persist));
        answer
    }

    /// Peer `from` answered this replica's join; its own incarnation was in the answer.
    pub fn on_join_answer(&mut self, from: ReplicaId, incarnation: u64) {
        let record = self.admission.learn(from, incarnation);
        self.out.extend(record.map(Output::Persist));
    }

    /// Admits this replica once every peer has answered its join (see
    /// [`crate::admission`]), and says whether it is admitted. The transactions it learned of
    /// meanwhile get their timers again: while it answered for none, a timer that fired did
    /// nothing and was not armed again.
    pub fn try_admit(&mut self, now: u64) -> bool {
        let me = self.cfg.id;
        let peers = (0..self.cfg.replicas).filter(|&r| r != me);
        if let Some(record) = self.admission.admit_if_all(peers) {
            self.out.push(Output::Persist(record));
            self.arm_idle(now);
        }
        self.admission.is_admitted()
    }

    /// Whether messages from peer `from`'s `incarnation` are heard; call it before
    /// [`Replica::on_message`] for each batch a replica sent.
    pub fn hears(&self, from: ReplicaId, incarnation: u64) -> bool {
        self.admission.hears(from, incarnation)
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
            self.arm(txn, now.saturating_add(delay));
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

    /// Decided-Committed transactions this replica still holds in full, in txid order after
    /// `after`, at most `limit`: what the audit expects every participant's database to prove.
    pub fn committed_after(
        &self,
        after: Option<TxnId>,
        limit: usize,
    ) -> Vec<(TxnId, Vec<Participant>, u64)> {
        use std::ops::Bound;
        let from = after.map_or(Bound::Unbounded, Bound::Excluded);
        self.acceptor
            .range((from, Bound::Unbounded))
            .filter(|(txn, _)| self.known_decision(**txn) == Some(Outcome::Committed))
            .take(limit)
            .map(|(txn, acc)| {
                let mut participants = self
                    .coordination
                    .get(txn)
                    .map(|c| c.participant_list())
                    .unwrap_or_default();
                if participants.is_empty() {
                    participants = acc.participants.clone();
                }
                (*txn, participants, acc.since)
            })
            .collect()
    }

    /// Why it aborted, when this replica decided so.
    pub fn cause(&self, txn: TxnId) -> Option<&AbortCause> {
        self.coordination.get(&txn).and_then(|c| c.cause.as_ref())
    }

    pub fn stats(&self) -> Stats {
        let mut stats = Stats {
            rejoined: self.rejoined,
            admitted: self.admission.is_admitted(),
            incarnation: self.admission.incarnation(),
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
        Record::Round { .. }
        | Record::Rejoined
        | Record::Incarnation { .. }
        | Record::Admitted
        | Record::Fence { .. } => None,
    }
}

#[cfg(test)]
mod tests {
    //! Regressions for inputs no honest party sends (found by an attacker and the fuzzers):
    //! each must leave the replica unharmed and the transaction decidable.

    use super::*;
    use crate::types::MAX_BALLOT;

    fn r() -> Vec<Participant> {
        vec![Participant::new("a", "a:1"), Participant::new("b", "b:1")]
    }

    /// A single-replica group (classic 2PC) with one transaction committed and waiting for
    /// votes: every phase 1 and 2 round trip happens inside one call.
    fn voting() -> (Replica, TxnId) {
        let mut rep = Replica::new(Config::new(0, 1), 1);
        let txn = rep.begin(0, 7);
        for p in r() {
            rep.enlist(0, txn, p).expect("enlist");
        }
        assert_eq!(rep.commit(0, txn), Ok(None));
        rep.drain();
        (rep, txn)
    }

    #[test]
    fn a_second_agent_for_one_participant_cannot_enlist() {
        let mut rep = Replica::new(Config::new(0, 1), 1);
        let txn = rep.begin(0, 7);
        rep.enlist(0, txn, Participant::new("a", "a:1"))
            .expect("first agent");
        rep.enlist(0, txn, Participant::new("a", "a:1"))
            .expect("the same agent again");
        assert!(matches!(
            rep.enlist(0, txn, Participant::new("a", "twin:1")),
            Err(TxnError::DuplicateParticipant { .. })
        ));
        assert_eq!(
            rep.status(txn).participants,
            vec![Participant::new("a", "a:1")]
        );
    }

    #[test]
    fn a_client_may_shorten_the_open_timeout_but_not_extend_it() {
        let mut rep = Replica::new(Config::new(0, 1), 1);
        let short = rep.begin_for(0, 1, 500);
        assert_eq!(rep.open_deadline(short), Some(500));
        let long = rep.begin_for(0, 2, u64::MAX);
        assert_eq!(rep.open_deadline(long), Some(rep.config().open_timeout_ms));
        rep.on_tick(501);
        assert_eq!(rep.status(short).decided, Some(Outcome::Aborted));
        assert_eq!(rep.status(long).decided, None);
    }

    fn vote(rep: &mut Replica, txn: TxnId, p: &str, vote: Vote) {
        let msg = Msg::Phase2a {
            txn,
            participant: p.into(),
            ballot: 0,
            vote,
            participants: r(),
        };
        rep.on_message(0, ReplicaId::MAX, msg);
    }

    /// Regression: a phase 1a with ballot u64::MAX overflowed `seen / replicas + 1` and
    /// `round * replicas + id` in the next phase 1 (a panic in debug builds; in release a
    /// wrapped ballot, and a transaction that could never decide).
    #[test]
    fn phase1a_with_an_absurd_ballot_is_dropped_and_the_transaction_still_decides() {
        let mut three = Replica::new(Config::new(0, 3), 1);
        let txn = TxnId::new(0, 5);
        for ballot in [u64::MAX, MAX_BALLOT + 1, u64::MAX - 1] {
            for from in [1, 2] {
                three.on_message(
                    0,
                    from,
                    Msg::Phase1a {
                        txn,
                        ballot,
                        participants: r(),
                    },
                );
            }
        }
        assert!(three.drain().is_empty());
        assert!(!three.status(txn).known);

        let (mut rep, txn) = voting();
        rep.on_message(
            0,
            0,
            Msg::Phase1a {
                txn,
                ballot: u64::MAX,
                participants: r(),
            },
        );
        rep.on_message(
            0,
            0,
            Msg::Nack {
                txn,
                ballot: 1,
                promised: u64::MAX,
            },
        );
        assert_eq!(rep.status(txn).promised, 0);
        assert_eq!(rep.round, 0);
        vote(&mut rep, txn, "a", Vote::Prepared);
        // A takeover (here: the replica itself) still finds a ballot and settles b's
        // instance as Aborted.
        assert_eq!(
            rep.resolve(10, txn, Some("b"), &[]),
            Ok(Some(Outcome::Aborted))
        );
        assert!(rep.round >= 1 && rep.status(txn).promised < MAX_BALLOT);
    }

    /// Regression: a corrupt log (a round or promise near u64::MAX) made the next phase 1
    /// overflow. Replay clamps; with no ballot left above the promise, the replica stands
    /// down instead of wrapping around to a used ballot.
    #[test]
    fn absurd_records_are_clamped_on_replay() {
        let txn = TxnId::new(0, 5);
        let records = vec![
            Record::Round { round: u64::MAX },
            Record::Promise {
                txn,
                ballot: u64::MAX,
                participants: r(),
            },
            Record::Accept {
                txn,
                participant: "a".into(),
                ballot: u64::MAX,
                vote: Vote::Prepared,
                participants: r(),
            },
        ];
        for replicas in [1, 3] {
            let mut rep = Replica::recover(Config::new(0, replicas), 1, &records, 0);
            assert!(rep.round <= max_round(replicas));
            assert_eq!(rep.status(txn).promised, MAX_BALLOT);
            assert_eq!(rep.resolve(0, txn, Some("b"), &r()), Ok(None));
            rep.on_tick(u64::MAX);
            let out = rep.drain();
            assert!(
                !out.iter()
                    .any(|o| matches!(o, Output::Persist(Record::Round { .. }))),
                "{out:?}"
            );
            assert!(rep.durable_records().iter().all(|rec| match rec {
                Record::Round { round } => *round <= max_round(replicas),
                Record::Promise { ballot, .. } | Record::Accept { ballot, .. } =>
                    *ballot <= MAX_BALLOT,
                _ => true,
            }));
        }
    }

    /// Messages no honest party sends change nothing: replica-only messages from outside the
    /// group, ballots owned by another replica, votes without R or for an instance outside
    /// R, transactions no replica of this group minted.
    #[test]
    fn malformed_messages_are_dropped() {
        let (mut rep, txn) = voting();
        let before = rep.clone();
        let foreign = TxnId::new(9, 1);
        let junk = vec![
            (
                5,
                Msg::Phase2b {
                    txn,
                    participant: "a".into(),
                    ballot: 0,
                    vote: Vote::Aborted,
                },
            ),
            (
                5,
                Msg::Decided {
                    txn,
                    outcome: Outcome::Aborted,
                    participants: r(),
                },
            ),
            (
                0,
                Msg::Phase2a {
                    txn,
                    participant: "a".into(),
                    ballot: 0,
                    vote: Vote::Aborted,
                    participants: vec![],
                },
            ),
            (
                0,
                Msg::Phase2a {
                    txn,
                    participant: "z".into(),
                    ballot: 0,
                    vote: Vote::Aborted,
                    participants: r(),
                },
            ),
            (
                0,
                Msg::Phase1b {
                    txn,
                    ballot: 1,
                    accepted: vec![("a".into(), u64::MAX, Vote::Aborted)],
                    participants: r(),
                },
            ),
            (
                0,
                Msg::Phase2a {
                    txn: foreign,
                    participant: "a".into(),
                    ballot: 0,
                    vote: Vote::Aborted,
                    participants: r(),
                },
            ),
            (
                0,
                Msg::Nack {
                    txn,
                    ballot: 7,
                    promised: 3,
                },
            ),
        ];
        for (from, msg) in junk {
            rep.on_message(0, from, msg.clone());
            assert!(rep.drain().is_empty(), "{msg:?} was not dropped");
        }
        assert_eq!(rep, before);
        // A three-replica group: a phase 1a or 2a whose ballot belongs to another replica.
        let mut three = Replica::new(Config::new(0, 3), 1);
        for (from, ballot) in [(1, 3), (2, 4), (1, 0)] {
            three.on_message(
                0,
                from,
                Msg::Phase1a {
                    txn,
                    ballot,
                    participants: r(),
                },
            );
            if ballot == 0 {
                continue; // a ballot-0 phase 2a is a participant's vote, whoever relays it
            }
            three.on_message(
                0,
                from,
                Msg::Phase2a {
                    txn,
                    participant: "a".into(),
                    ballot,
                    vote: Vote::Aborted,
                    participants: r(),
                },
            );
        }
        assert!(three.drain().is_empty());
        // The honest votes still commit.
        vote(&mut rep, txn, "a", Vote::Prepared);
        vote(&mut rep, txn, "b", Vote::Prepared);
        assert_eq!(rep.status(txn).decided, Some(Outcome::Committed));
    }

    /// Regression (found by the replica fuzzer): an in-doubt participant asking about a
    /// transaction this replica had retired started a phase 1 whose own 1a it then dropped as
    /// a late duplicate, and retried forever, persisting a new round each time. It now hears
    /// that the transaction was forgotten.
    #[test]
    fn resolving_a_retired_transaction_says_so_and_starts_nothing() {
        let (mut rep, txn) = voting();
        vote(&mut rep, txn, "a", Vote::Prepared);
        vote(&mut rep, txn, "b", Vote::Prepared);
        assert_eq!(rep.status(txn).decided, Some(Outcome::Committed));
        rep.on_applied(1, txn, "a");
        rep.on_applied(1, txn, "b");
        rep.on_tick(1 + rep.config().retention_ms);
        assert!(rep.status(txn).expired);
        rep.drain();
        assert_eq!(
            rep.resolve(2, txn, Some("a"), &r()),
            Err(TxnError::Unknown { txn, expired: true })
        );
        assert_eq!(rep.next_deadline(), None);
        assert!(rep.drain().is_empty());
    }

    /// Regression (found by the log fuzzer, which recovers replicas at any clock value):
    /// deadlines near u64::MAX overflowed, and a tick at u64::MAX would have refired timers
    /// that re-armed at the saturated deadline forever.
    #[test]
    fn deadlines_saturate_and_a_tick_fires_each_timer_once() {
        let (mut rep, txn) = voting();
        vote(&mut rep, txn, "a", Vote::Prepared);
        rep.on_tick(u64::MAX - 5);
        rep.on_tick(u64::MAX);
        rep.on_tick(u64::MAX);
        assert_eq!(rep.next_deadline(), Some(u64::MAX));
    }

    /// A transaction id no replica of this group minted (its leader byte names no replica)
    /// is unknown: a phase 1 for it would be dropped everywhere and retried forever.
    #[test]
    fn resolving_a_transaction_of_no_replica_of_the_group_is_refused() {
        let mut three = Replica::new(Config::new(0, 3), 1);
        let txn = TxnId::new(9, 1);
        assert_eq!(
            three.resolve(0, txn, Some("a"), &r()),
            Err(TxnError::Unknown {
                txn,
                expired: false
            })
        );
        assert_eq!(three.commit(0, txn), three.abort(0, txn));
        assert!(three.drain().is_empty());
        assert_eq!(three.next_deadline(), None);
    }

    /// The R an in-doubt caller supplies is a hint: one that lists a participant twice, or
    /// leaves out the caller itself, is not learned.
    #[test]
    fn an_r_from_a_caller_is_never_learned() {
        for given in [
            vec![Participant::new("a", "a:1"), Participant::new("a", "a:2")],
            vec![Participant::new("b", "b:1")],
            r(),
        ] {
            let mut rep = Replica::new(Config::new(0, 1), 1);
            let txn = TxnId::new(0, 9);
            let _ = rep.resolve(0, txn, Some("a"), &given);
            assert!(rep.status(txn).participants.is_empty(), "{given:?}");
        }
    }
}
