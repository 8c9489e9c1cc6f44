//! Fuzz target: three real `Replica`s (a 2F+1 = 3 group) driven by a fuzzer-controlled world,
//! checking that nothing panics and that the safety properties of DESIGN.md hold.
//!
//! Honest parties, adversarial schedule: the replicas exchange their real outputs through a
//! network that the fuzzer controls (deliver any message, drop, duplicate, reorder, delay
//! arbitrarily), and the fuzzer crashes replicas and restarts them from exactly their
//! `Persist` records (plus `PersistLazy` hints only if a later fsync covered them). Clients
//! begin, enlist, commit and abort on any replica; participants vote in ballot 0 when Prepare
//! reaches them, each at most one value (Prepared, Aborted, or nothing at all) and resend it
//! when asked again; in-doubt participants and operators call `resolve`; Decide is confirmed
//! (`on_applied`) through the network. Time moves in fuzzer-chosen steps.
//!
//! On top of that, three kinds of input no honest party sends:
//! * *malformed* messages (ballots above `MAX_BALLOT`, replica-only messages from outside the
//!   group, ballots not owned by their sender, votes without R or for an instance outside R,
//!   transactions no replica of this group minted, agent-only messages): each must leave the
//!   replica exactly as it was, with no output;
//! * *trash*: arbitrary well-formed messages (any kind, any value, ballots up to the limit)
//!   about transactions reserved for them: they must not panic anything, and no safety
//!   property is checked for those transactions (a forged Decided decides whatever it says);
//! * *phantom* transactions that no client began here, whose participants vote (one value
//!   each) straight to the acceptors: the paths of a replica that learns of a transaction
//!   from the acceptors only. They are honest, so their decisions are checked too.
//!
//! Checked after every step, over the honest and phantom transactions:
//! * each instance chooses at most one value (chosen: accepted in one ballot by a majority,
//!   from the replicas' durable Accept records, which only grow);
//! * TCConsistent: every decision anyone announces (Output::Decided/Finished, Decided to
//!   replicas, Decide to participants, a client call's answer) is the same for a transaction;
//! * Commit only if every participant of R voted Prepared and its instance chose Prepared;
//!   Abort only if some instance of R chose Aborted, or the transaction never left Open;
//! * every R anyone announces (Prepare, Decided) is the R the leader froze;
//! * a replica persists strictly increasing rounds, and proposes only its own ballots, below
//!   `MAX_BALLOT`; nothing it sends carries a ballot above it;
//! * compaction loses nothing: `durable_records()` rebuilds the same acceptor state.
//!
//! And at the end (unless trash pushed ballots to the limit, where standing down is the
//! intended answer), liveness after the faults heal: with every replica up and the network
//! reliable, every transaction with an in-doubt participant gets decided and every such
//! participant learns the decision (or, having asked only after the retention window of a
//! decided transaction, hears that it was retired: the operator's case, by design).
//!
//! Not modelled: a restart replays the whole uncompacted log. Compaction drops a retired
//! transaction, which is safe only if no message about it outlives the retention window (the
//! deployment's assumption, not the core's); the compaction check above covers the rest.
//!
//! `PXC_FUZZ_TRACE=1` prints every step of a replayed case (`PXC_FUZZ_CASE`).

#[path = "fuzzkit/mod.rs"]
mod fuzzkit;

use fuzzkit::Rng;
use paxos_commit_core::participant;
use paxos_commit_core::types::{ballot_owner, MAX_BALLOT};
use paxos_commit_core::{
    Config, Dest, Msg, Outcome, Output, Participant, Record, Replica, ReplicaId, TxnError, TxnId,
    Vote,
};
use std::collections::{BTreeMap, BTreeSet};

const N: u32 = 3;
const AGENTS: [&str; 3] = ["a", "b", "c"];
/// Honest transactions begun per case: enough to interleave, few enough to decide.
const MAX_BEGUN: usize = 4;

fn config(id: ReplicaId) -> Config {
    // Short timers so that takeovers, resends and retention all happen within a case.
    Config {
        takeover_after_ms: 200,
        open_timeout_ms: 1_500,
        resend_after_ms: 100,
        retention_ms: 10_000,
        ..Config::new(id, N)
    }
}

fn agent(id: &str) -> Participant {
    Participant::new(id, format!("{id}:5432"))
}

/// Transactions the trash messages are about: no invariant is checked for them.
fn trash_txns() -> [TxnId; 3] {
    [
        TxnId::new(0, 0x7a5_0000_0001 << 8),
        TxnId::new(1, 0x7a5_0000_0002 << 8),
        TxnId::new(2, 0x7a5_0000_0003 << 8),
    ]
}

/// Transactions begun "elsewhere": their participants vote straight to the acceptors.
fn phantom_txns() -> [TxnId; 2] {
    [
        TxnId::new(1, 0xf00_0000_0001 << 8),
        TxnId::new(2, 0xf00_0000_0002 << 8),
    ]
}

fn phantom_r() -> Vec<Participant> {
    vec![agent("a"), agent("b")]
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Replica(ReplicaId),
    Agent(String),
}

#[derive(Debug, Clone)]
enum Wire {
    Core(Msg),
    /// The participant's confirmation that it applied a decision (`on_applied`).
    Applied {
        txn: TxnId,
        participant: String,
    },
}

#[derive(Debug, Clone)]
struct Envelope {
    from: Node,
    to: Node,
    wire: Wire,
}

/// One participant's part in one transaction.
#[derive(Debug, Clone, Default)]
struct AgentTxn {
    /// R as Prepare told it (empty until then).
    participants: Vec<Participant>,
    /// None: has not voted yet; Some(None): does not know whether it prepared (sends nothing,
    /// in doubt); Some(Some(v)): voted v, its only value ever.
    intent: Option<Option<Vote>>,
    outcome: Option<Outcome>,
    /// A replica answered that the transaction was forgotten after its retention window: the
    /// participant stops asking (what is left is an operator's job).
    forgotten: bool,
}

impl AgentTxn {
    fn in_doubt(&self) -> bool {
        self.outcome.is_none()
            && !self.forgotten
            && matches!(self.intent, Some(None | Some(Vote::Prepared)))
    }
}

#[derive(Debug, Clone, Default)]
struct TxnInfo {
    /// The participant set R as the leader froze it (from Prepare), or the phantom's.
    r: Option<BTreeSet<String>>,
    decided: Option<Outcome>,
}

struct Sim {
    rng: Rng,
    trace: bool,
    now: u64,
    replicas: Vec<Option<Replica>>,
    durable: Vec<Vec<Record>>,
    /// Lazy records written but not yet covered by an fsync: a crash may lose them.
    pending_lazy: Vec<Vec<Record>>,
    last_round: Vec<u64>,
    net: Vec<Envelope>,
    agents: BTreeMap<(TxnId, String), AgentTxn>,
    txns: BTreeMap<TxnId, TxnInfo>,
    begun: usize,
    accepts: BTreeMap<(TxnId, String, u64, Vote), BTreeSet<ReplicaId>>,
    chosen: BTreeMap<(TxnId, String), BTreeSet<Vote>>,
    /// Some trash carried a ballot near the limit: a replica may have run out of ballots, and
    /// standing down is then the intended behaviour, so liveness is not checked.
    near_limit: bool,
    steps: u64,
    /// What the case exercised, summed over the run and printed: a fuzzer whose cases never
    /// commit, or never take over, proves little.
    stats: BTreeMap<&'static str, u64>,
}

impl Sim {
    fn new(mut rng: Rng) -> Sim {
        let replicas = (0..N)
            .map(|id| Some(Replica::new(config(id), rng.next_u64())))
            .collect();
        let mut txns = BTreeMap::new();
        for t in phantom_txns() {
            txns.insert(
                t,
                TxnInfo {
                    r: Some(phantom_r().into_iter().map(|p| p.id).collect()),
                    decided: None,
                },
            );
        }
        Sim {
            rng,
            trace: std::env::var_os("PXC_FUZZ_TRACE").is_some(),
            now: 1_000,
            replicas,
            durable: vec![Vec::new(); N as usize],
            pending_lazy: vec![Vec::new(); N as usize],
            last_round: vec![0; N as usize],
            net: Vec::new(),
            agents: BTreeMap::new(),
            txns,
            begun: 0,
            accepts: BTreeMap::new(),
            chosen: BTreeMap::new(),
            near_limit: false,
            steps: 0,
            stats: BTreeMap::new(),
        }
    }

    fn count(&mut self, what: &'static str) {
        *self.stats.entry(what).or_default() += 1;
    }

    fn log(&self, what: impl FnOnce() -> String) {
        if self.trace {
            println!("[{} t={}] {}", self.steps, self.now, what());
        }
    }

    fn live(&self) -> Vec<ReplicaId> {
        (0..N)
            .filter(|r| self.replicas[*r as usize].is_some())
            .collect()
    }

    fn random_live(&mut self) -> Option<ReplicaId> {
        let live = self.live();
        (!live.is_empty()).then(|| *self.rng.pick(&live))
    }

    fn is_trash(txn: TxnId) -> bool {
        trash_txns().contains(&txn)
    }

    /// Runs `f` on replica `r` (if up) and routes what it produced.
    fn with<T>(&mut self, r: ReplicaId, f: impl FnOnce(&mut Replica, u64) -> T) -> Option<T> {
        let now = self.now;
        let replica = self.replicas[r as usize].as_mut()?;
        let result = f(replica, now);
        let outputs = replica.drain();
        self.absorb(r, outputs);
        Some(result)
    }

    // ------------------------------------------------------------------ invariants

    fn fail(&self, what: String) -> ! {
        panic!("step {} (t={}): {what}", self.steps, self.now)
    }

    /// Someone announced `outcome` for `txn`.
    fn observe(&mut self, txn: TxnId, outcome: Outcome, who: &str) {
        if Self::is_trash(txn) {
            return;
        }
        let info = self.txns.entry(txn).or_default();
        match info.decided {
            Some(o) if o != outcome => {
                let msg = format!("TCConsistent: {txn:?} decided {o} and then {outcome} ({who})");
                self.fail(msg)
            }
            Some(_) => return,
            None => info.decided = Some(outcome),
        }
        let r = info.r.clone();
        let phantom = phantom_txns().contains(&txn);
        self.count(match (phantom, outcome) {
            (false, Outcome::Committed) => "client transactions committed",
            (false, Outcome::Aborted) => "client transactions aborted",
            (true, Outcome::Committed) => "phantom transactions committed",
            (true, Outcome::Aborted) => "phantom transactions aborted",
        });
        match (outcome, r) {
            (Outcome::Committed, None) => {
                // Only a transaction that touched no participant commits without a Prepare.
                if self.agents.keys().any(|(t, _)| *t == txn) {
                    self.fail(format!("{txn:?} committed without R ({who})"));
                }
                self.txns.entry(txn).or_default().r = Some(BTreeSet::new());
            }
            (Outcome::Committed, Some(r)) => {
                for p in &r {
                    let chosen = self.chosen.get(&(txn, p.clone()));
                    if chosen != Some(&BTreeSet::from([Vote::Prepared])) {
                        self.fail(format!(
                            "{txn:?} committed ({who}) but {p}'s instance chose {chosen:?}"
                        ));
                    }
                    let intent = self.agents.get(&(txn, p.clone())).and_then(|a| a.intent);
                    if intent != Some(Some(Vote::Prepared)) {
                        self.fail(format!(
                            "{txn:?} committed ({who}) but {p} did not vote Prepared ({intent:?})"
                        ));
                    }
                }
            }
            (Outcome::Aborted, None) => {} // aborted while open: nothing was prepared
            (Outcome::Aborted, Some(r)) => {
                let some_aborted = r.iter().any(|p| {
                    self.chosen.get(&(txn, p.clone())) == Some(&BTreeSet::from([Vote::Aborted]))
                });
                if !some_aborted {
                    self.fail(format!(
                        "{txn:?} aborted ({who}) but no instance of {r:?} chose Aborted"
                    ));
                }
            }
        }
    }

    /// Someone announced R for `txn`: it must be the one R.
    fn observe_r(&mut self, txn: TxnId, participants: &[Participant], who: &str) {
        if Self::is_trash(txn) || participants.is_empty() {
            return;
        }
        let ids: BTreeSet<String> = participants.iter().map(|p| p.id.clone()).collect();
        if ids.len() != participants.len() {
            self.fail(format!("{who}: {txn:?}'s R lists a participant twice"));
        }
        let info = self.txns.entry(txn).or_default();
        match &info.r {
            Some(r) if *r != ids => {
                let msg = format!("{who}: {txn:?} has R {r:?} and also {ids:?}");
                self.fail(msg)
            }
            Some(_) => {}
            None => {
                if info.decided.is_some() {
                    let msg = format!("{who}: {txn:?} was decided before its R {ids:?} was");
                    self.fail(msg)
                }
                info.r = Some(ids);
            }
        }
    }

    fn check_record(&mut self, r: ReplicaId, record: &Record) {
        match record {
            Record::Round { round } => {
                if *round <= self.last_round[r as usize] {
                    self.fail(format!(
                        "replica {r} persisted round {round} after round {}",
                        self.last_round[r as usize]
                    ));
                }
                self.last_round[r as usize] = *round;
                self.count("phase 1 rounds started");
            }
            Record::Accept {
                txn,
                participant,
                ballot,
                vote,
                ..
            } => {
                if *ballot > MAX_BALLOT {
                    self.fail(format!("replica {r} accepted ballot {ballot}"));
                }
                if Self::is_trash(*txn) {
                    return;
                }
                let who = self
                    .accepts
                    .entry((*txn, participant.clone(), *ballot, *vote))
                    .or_default();
                who.insert(r);
                if who.len() as u32 > N / 2 {
                    let chosen = self.chosen.entry((*txn, participant.clone())).or_default();
                    chosen.insert(*vote);
                    if chosen.len() > 1 {
                        let msg = format!("{txn:?}: instance {participant} chose both values");
                        self.fail(msg)
                    }
                }
            }
            Record::Promise { ballot, .. } if *ballot > MAX_BALLOT => {
                self.fail(format!("replica {r} promised ballot {ballot}"))
            }
            _ => {}
        }
    }

    fn check_send(&mut self, r: ReplicaId, to: &Dest, msg: &Msg) {
        let who = format!("replica {r} sent {msg:?}");
        if let Dest::Replica(to) = to {
            if *to >= N || *to == r {
                self.fail(format!("{who} to replica {to}"));
            }
        }
        let ballots: Vec<u64> = match msg {
            Msg::Phase1a { ballot, .. } | Msg::Phase2b { ballot, .. } => vec![*ballot],
            Msg::Phase2a { ballot, .. } => vec![*ballot],
            Msg::Phase1b {
                ballot, accepted, ..
            } => std::iter::once(*ballot)
                .chain(accepted.iter().map(|(_, b, _)| *b))
                .collect(),
            Msg::Nack {
                ballot, promised, ..
            } => vec![*ballot, *promised],
            _ => vec![],
        };
        if ballots.iter().any(|b| *b > MAX_BALLOT) {
            self.fail(format!("{who}: a ballot above the limit"));
        }
        match msg {
            // A proposer's ballots are its own and below the limit.
            Msg::Phase1a { txn, ballot, .. } | Msg::Phase2a { txn, ballot, .. }
                if !Self::is_trash(*txn)
                    && *ballot > 0
                    && (ballot_owner(*ballot, N) != r || *ballot >= MAX_BALLOT) =>
            {
                self.fail(format!("{who}: not a ballot of its own"))
            }
            Msg::Phase2a { ballot: 0, .. } => self.fail(format!("{who}: only agents vote")),
            Msg::Prepare { txn, participants } => {
                self.observe_r(*txn, participants, &who);
                if let Dest::Agent(p) = to {
                    if !participants.contains(p) {
                        self.fail(format!("{who}: to {} outside R", p.id));
                    }
                }
            }
            Msg::Decided {
                txn,
                outcome,
                participants,
            } => {
                self.observe_r(*txn, participants, &who);
                self.observe(*txn, *outcome, &who);
            }
            Msg::Decide { txn, outcome } | Msg::Finished { txn, outcome } => {
                self.observe(*txn, *outcome, &who)
            }
            _ => {}
        }
    }

    fn absorb(&mut self, r: ReplicaId, outputs: Vec<Output>) {
        let i = r as usize;
        let mut synced = false;
        for output in outputs {
            match output {
                Output::Persist(record) => {
                    self.check_record(r, &record);
                    self.durable[i].push(record);
                    synced = true;
                }
                Output::PersistLazy(record) => self.pending_lazy[i].push(record),
                Output::Send { to, msg } => {
                    self.check_send(r, &to, &msg);
                    let to = match to {
                        Dest::Replica(to) => Node::Replica(to),
                        Dest::Agent(p) => Node::Agent(p.id),
                    };
                    self.net.push(Envelope {
                        from: Node::Replica(r),
                        to,
                        wire: Wire::Core(msg),
                    });
                }
                Output::Decided { txn, outcome, .. } => {
                    self.observe(txn, outcome, &format!("replica {r} decided"))
                }
                Output::Finished { txn, outcome } => {
                    self.observe(txn, outcome, &format!("replica {r} finished"))
                }
            }
        }
        if synced {
            // The step's fsync also covers the lazy hints written before or with it.
            let lazy = std::mem::take(&mut self.pending_lazy[i]);
            self.durable[i].extend(lazy);
        }
    }

    /// Compaction loses nothing: a replica rebuilt from `durable_records()` has the same
    /// acceptor state for every transaction (a finished one: the same outcome).
    fn check_compaction(&mut self, r: ReplicaId) {
        let Some(replica) = self.replicas[r as usize].as_ref() else {
            return;
        };
        let compact = replica.durable_records();
        let rebuilt = Replica::recover(config(r), 1, &compact, self.now);
        let txns: BTreeSet<TxnId> = self.txns.keys().copied().chain(trash_txns()).collect();
        for txn in txns {
            let (a, b) = (replica.status(txn), rebuilt.status(txn));
            // A finished transaction compacts to its outcome alone, by design: its votes
            // can no longer matter.
            let same = if a.finished {
                // (A trash transaction's forged Decided and Finished may disagree.)
                b.finished && (Self::is_trash(txn) || a.decided == b.decided)
            } else {
                // (A decision that only the coordination knows, an open transaction aborted
                // here, is volatile by design: no acceptor ever heard of it.)
                (a.promised, &a.accepted) == (b.promised, &b.accepted)
            };
            if !same {
                self.fail(format!(
                    "replica {r}: compaction changed {txn:?}: {a:?} became {b:?}"
                ));
            }
        }
    }

    // ------------------------------------------------------------------ the world

    fn deliver(&mut self, env: Envelope) {
        self.log(|| format!("deliver {env:?}"));
        match env.to {
            Node::Replica(r) => {
                let from = match env.from {
                    Node::Replica(f) => f,
                    // An agent's vote: `from` is meaningless, whatever it says.
                    Node::Agent(_) => *self.rng.pick(&[0, 1, 2, 7, ReplicaId::MAX]),
                };
                match env.wire {
                    Wire::Core(msg) => {
                        self.with(r, |rep, now| rep.on_message(now, from, msg));
                    }
                    Wire::Applied { txn, participant } => {
                        self.with(r, |rep, now| rep.on_applied(now, txn, &participant));
                    }
                }
            }
            Node::Agent(id) => {
                let Wire::Core(msg) = env.wire else {
                    self.fail("an agent got an Applied".into())
                };
                if Self::is_trash(msg.txn()) {
                    return;
                }
                match msg {
                    Msg::Prepare { txn, participants } => {
                        let intent = {
                            let roll = self.rng.below(100);
                            match roll {
                                0..70 => Some(Vote::Prepared),
                                70..85 => Some(Vote::Aborted),
                                _ => None,
                            }
                        };
                        let a = self.agents.entry((txn, id.clone())).or_default();
                        if a.participants.is_empty() {
                            a.participants = participants;
                        }
                        let intent = *a.intent.get_or_insert(intent);
                        if let Some(v) = intent {
                            self.vote(txn, &id, v);
                        }
                    }
                    Msg::Decide { txn, outcome } => {
                        self.agent_learns(txn, &id, outcome);
                        self.net.push(Envelope {
                            from: Node::Agent(id.clone()),
                            to: env.from,
                            wire: Wire::Applied {
                                txn,
                                participant: id,
                            },
                        });
                    }
                    other => self.fail(format!("agent {id} got {other:?}")),
                }
            }
        }
    }

    /// Participant `id` is told the outcome (a Decide, or the answer to its resolve).
    fn agent_learns(&mut self, txn: TxnId, id: &str, outcome: Outcome) {
        let a = self.agents.entry((txn, id.to_string())).or_default();
        if a.outcome.is_some_and(|o| o != outcome) {
            let msg = format!("{id} told {outcome} after {:?}", a.outcome);
            self.fail(msg)
        }
        if outcome == Outcome::Committed && a.intent != Some(Some(Vote::Prepared)) {
            let msg = format!("{id} told to commit {txn:?} after {:?}", a.intent);
            self.fail(msg)
        }
        a.outcome = Some(outcome);
    }

    /// What an in-doubt participant does with the answer to its resolve.
    fn agent_answer(
        &mut self,
        txn: TxnId,
        id: &str,
        r: ReplicaId,
        res: Option<Result<Option<Outcome>, TxnError>>,
    ) {
        match res {
            Some(Ok(Some(outcome))) => {
                self.observe(txn, outcome, &format!("{id}'s resolve on {r}"));
                self.agent_learns(txn, id, outcome);
            }
            Some(Err(TxnError::Unknown { expired: true, .. })) => {
                // A replica forgets only what was decided (and kept for the retention window).
                if self.txns.get(&txn).and_then(|i| i.decided).is_none() {
                    self.fail(format!("replica {r} forgot {txn:?} before it was decided"));
                }
                if let Some(a) = self.agents.get_mut(&(txn, id.to_string())) {
                    a.forgotten = true;
                }
            }
            _ => {}
        }
    }

    /// Participant `id`'s ballot-0 vote (always the same value) to every acceptor.
    fn vote(&mut self, txn: TxnId, id: &str, vote: Vote) {
        let participants = self
            .agents
            .get(&(txn, id.to_string()))
            .map(|a| a.participants.clone())
            .unwrap_or_default();
        for (r, msg) in participant::vote(txn, id, vote, &participants, N) {
            self.net.push(Envelope {
                from: Node::Agent(id.to_string()),
                to: Node::Replica(r),
                wire: Wire::Core(msg),
            });
        }
    }

    fn tick(&mut self, r: ReplicaId) {
        self.with(r, |rep, now| rep.on_tick(now));
    }

    fn advance(&mut self, ms: u64) {
        self.now += ms;
        for r in 0..N {
            self.tick(r);
        }
    }

    fn crash(&mut self, r: ReplicaId) {
        self.log(|| format!("crash {r}"));
        self.count("crashes");
        self.replicas[r as usize] = None;
        if self.rng.bool() {
            // The hints the crash caught before any fsync covered them are lost.
            self.pending_lazy[r as usize].clear();
        }
    }

    fn restart(&mut self, r: ReplicaId) {
        self.log(|| format!("restart {r}"));
        let i = r as usize;
        let lazy = std::mem::take(&mut self.pending_lazy[i]);
        self.durable[i].extend(lazy);
        let seed = self.rng.next_u64();
        let replica = Replica::recover(config(r), seed, &self.durable[i], self.now);
        self.replicas[i] = Some(replica);
        self.tick(r);
    }

    fn honest_txns(&self) -> Vec<TxnId> {
        self.txns.keys().copied().collect()
    }

    fn random_txn(&mut self) -> Option<TxnId> {
        let txns = self.honest_txns();
        (!txns.is_empty()).then(|| *self.rng.pick(&txns))
    }

    fn client_answer(&mut self, txn: TxnId, answer: Option<Outcome>, what: &str) {
        if let Some(o) = answer {
            self.observe(txn, o, what);
        }
    }

    fn step(&mut self) {
        self.steps += 1;
        let roll = self.rng.below(100);
        match roll {
            0..30 => {
                if !self.net.is_empty() {
                    let i = self.rng.index(self.net.len());
                    let env = self.net.swap_remove(i);
                    self.deliver(env);
                }
            }
            30..40 => {
                if !self.net.is_empty() {
                    let env = self.net.remove(0);
                    self.deliver(env);
                }
            }
            40..44 => {
                if !self.net.is_empty() {
                    let i = self.rng.index(self.net.len());
                    let env = self.net.swap_remove(i);
                    self.log(|| format!("drop {env:?}"));
                }
            }
            44..46 => {
                if !self.net.is_empty() {
                    let i = self.rng.index(self.net.len());
                    let env = self.net[i].clone();
                    self.net.push(env);
                }
            }
            46..53 => {
                let ms = 1 + self.rng.below(300);
                self.log(|| format!("advance {ms} ms"));
                self.advance(ms);
            }
            53..55 => {
                let r = self.rng.below(u64::from(N)) as ReplicaId;
                self.tick(r);
            }
            55 => {
                let ms = 1_000 + self.rng.below(20_000);
                self.log(|| format!("advance {ms} ms"));
                self.advance(ms);
            }
            56..58 => {
                if let Some(r) = self.random_live() {
                    self.crash(r);
                }
            }
            58..62 => {
                let down: Vec<ReplicaId> = (0..N)
                    .filter(|r| self.replicas[*r as usize].is_none())
                    .collect();
                if !down.is_empty() {
                    let r = *self.rng.pick(&down);
                    self.restart(r);
                }
            }
            62..66 => {
                if self.begun < MAX_BEGUN {
                    if let Some(r) = self.random_live() {
                        let nonce = self.rng.below(1 << 40);
                        if let Some(txn) = self.with(r, |rep, now| rep.begin(now, nonce)) {
                            self.log(|| format!("begin {txn:?} on {r}"));
                            self.begun += 1;
                            self.txns.entry(txn).or_default();
                        }
                    }
                }
            }
            66..73 => {
                if let Some(txn) = self.random_txn() {
                    let p = agent(AGENTS[self.rng.index(AGENTS.len())]);
                    let r = if self.rng.chance(4, 5) {
                        txn.leader()
                    } else {
                        self.rng.below(u64::from(N)) as ReplicaId
                    };
                    let res = self.with(r, |rep, now| rep.enlist(now, txn, p));
                    self.log(|| format!("enlist in {txn:?} on {r}: {res:?}"));
                }
            }
            73..77 => {
                if let Some(txn) = self.random_txn() {
                    let r = if self.rng.chance(3, 4) {
                        txn.leader()
                    } else {
                        self.rng.below(u64::from(N)) as ReplicaId
                    };
                    let res = self.with(r, |rep, now| rep.commit(now, txn));
                    self.log(|| format!("commit {txn:?} on {r}: {res:?}"));
                    if let Some(Ok(answer)) = res {
                        self.client_answer(txn, answer, &format!("commit on {r}"));
                    }
                }
            }
            77 => {
                if let (Some(txn), Some(r)) = (self.random_txn(), self.random_live()) {
                    let res = self.with(r, |rep, now| rep.abort(now, txn));
                    self.log(|| format!("abort {txn:?} on {r}: {res:?}"));
                    if let Some(Ok(answer)) = res {
                        self.client_answer(txn, answer, &format!("abort on {r}"));
                    }
                }
            }
            78..81 => self.agent_resolves(),
            81 => {
                if let (Some(txn), Some(r)) = (self.random_txn(), self.random_live()) {
                    let res = self.with(r, |rep, now| rep.resolve(now, txn, None, &[]));
                    self.log(|| format!("operator resolve {txn:?} on {r}: {res:?}"));
                    if let Some(Ok(answer)) = res {
                        self.client_answer(txn, answer, &format!("resolve on {r}"));
                    }
                }
                self.foreign_calls();
            }
            82..84 => {
                // A participant sends its vote again (its one value), as on a repeated Prepare.
                let voted: Vec<(TxnId, String, Vote)> = self
                    .agents
                    .iter()
                    .filter_map(|((t, p), a)| a.intent.flatten().map(|v| (*t, p.clone(), v)))
                    .collect();
                if !voted.is_empty() {
                    let (t, p, v) = self.rng.pick(&voted).clone();
                    self.vote(t, &p, v);
                }
            }
            84..86 => self.phantom_vote(),
            86..91 => self.malformed(),
            91..95 => self.trash(),
            95 => {
                if let Some(r) = self.random_live() {
                    self.check_compaction(r);
                }
            }
            _ => {
                // Queries: must not panic, whatever the state.
                if let Some(r) = self.random_live() {
                    let txns: Vec<TxnId> = self.txns.keys().copied().chain(trash_txns()).collect();
                    if let Some(rep) = self.replicas[r as usize].as_ref() {
                        for t in txns {
                            let _ = rep.status(t);
                            let _ = rep.cause(t);
                            let _ = rep.open_deadline(t);
                        }
                        let _ = rep.stats();
                        let _ = rep.next_deadline();
                    }
                }
            }
        }
    }

    /// An in-doubt participant asks a replica for the outcome, with or without R.
    fn agent_resolves(&mut self) {
        let doubtful: Vec<(TxnId, String)> = self
            .agents
            .iter()
            .filter(|(_, a)| a.in_doubt())
            .map(|(k, _)| k.clone())
            .collect();
        if doubtful.is_empty() {
            return;
        }
        let (txn, p) = self.rng.pick(&doubtful).clone();
        let Some(r) = self.random_live() else {
            return;
        };
        let participants = if self.rng.bool() {
            self.agents[&(txn, p.clone())].participants.clone()
        } else {
            Vec::new()
        };
        let res = self.with(r, |rep, now| rep.resolve(now, txn, Some(&p), &participants));
        self.log(|| format!("{p} resolves {txn:?} on {r}: {res:?}"));
        self.agent_answer(txn, &p, r, res);
    }

    /// Client and participant calls about a transaction id no replica of this group minted:
    /// refused, with no trace.
    fn foreign_calls(&mut self) {
        let Some(r) = self.random_live() else {
            return;
        };
        let txn = TxnId::new(N + self.rng.below(250) as u32, self.rng.next_u64());
        let p = agent(AGENTS[self.rng.index(AGENTS.len())]);
        let Some(replica) = self.replicas[r as usize].as_mut() else {
            return;
        };
        let before = replica.clone();
        let now = self.now;
        let answers = [
            replica.resolve(now, txn, Some(&p.id), std::slice::from_ref(&p)),
            replica.resolve(now, txn, None, &[]),
            replica.commit(now, txn),
            replica.abort(now, txn),
            replica.enlist(now, txn, p.clone()).map(|()| None),
        ];
        replica.on_applied(now, txn, &p.id);
        let outputs = replica.drain();
        if answers.iter().any(Result::is_ok) || !outputs.is_empty() || *replica != before {
            self.fail(format!(
                "replica {r} served {txn:?}, which no replica of the group minted: {answers:?}"
            ));
        }
    }

    /// A participant of a transaction begun elsewhere votes (its one value) with R.
    fn phantom_vote(&mut self) {
        let txn = *self.rng.pick(&phantom_txns());
        let p = self.rng.pick(&["a", "b"]).to_string();
        let intent = match self.rng.below(10) {
            0..6 => Some(Vote::Prepared),
            6..8 => Some(Vote::Aborted),
            _ => None,
        };
        let a = self.agents.entry((txn, p.clone())).or_default();
        if a.participants.is_empty() {
            a.participants = phantom_r();
        }
        if let Some(v) = *a.intent.get_or_insert(intent) {
            self.log(|| format!("phantom {p} votes {v:?} in {txn:?}"));
            self.vote(txn, &p, v);
        }
    }

    // ------------------------------------------------------------------ hostile input

    fn random_participants(&mut self) -> Vec<Participant> {
        let n = self.rng.below(4);
        (0..n)
            .map(|_| {
                if self.rng.chance(3, 4) {
                    agent(AGENTS[self.rng.index(AGENTS.len())])
                } else {
                    Participant::new(format!("x{}", self.rng.below(5)), "x:1")
                }
            })
            .collect()
    }

    fn random_participant(&mut self) -> String {
        match self.rng.below(6) {
            0 => String::new(),
            1 => format!("x{}", self.rng.below(5)),
            _ => self.rng.pick(&AGENTS).to_string(),
        }
    }

    fn random_ballot(&mut self) -> u64 {
        match self.rng.below(60) {
            0..10 => 0,
            // Rare: it ends the liveness check of the case (see `near_limit`).
            10 => {
                self.near_limit = true;
                MAX_BALLOT - self.rng.below(8)
            }
            _ => self.rng.below(20),
        }
    }

    fn random_vote(&mut self) -> Vote {
        if self.rng.bool() {
            Vote::Prepared
        } else {
            Vote::Aborted
        }
    }

    fn random_outcome(&mut self) -> Outcome {
        if self.rng.bool() {
            Outcome::Committed
        } else {
            Outcome::Aborted
        }
    }

    /// Any message at all about `txn` (well-formed or not).
    fn random_msg(&mut self, txn: TxnId) -> Msg {
        match self.rng.below(9) {
            0 => Msg::Phase1a {
                txn,
                ballot: self.random_ballot(),
                participants: self.random_participants(),
            },
            1 => Msg::Phase1b {
                txn,
                ballot: self.random_ballot(),
                accepted: (0..self.rng.below(3))
                    .map(|_| {
                        (
                            self.random_participant(),
                            self.random_ballot(),
                            self.random_vote(),
                        )
                    })
                    .collect(),
                participants: self.random_participants(),
            },
            2 => Msg::Phase2a {
                txn,
                participant: self.random_participant(),
                ballot: self.random_ballot(),
                vote: self.random_vote(),
                participants: self.random_participants(),
            },
            3 => Msg::Phase2b {
                txn,
                participant: self.random_participant(),
                ballot: self.random_ballot(),
                vote: self.random_vote(),
            },
            4 => Msg::Nack {
                txn,
                ballot: self.random_ballot(),
                promised: self.random_ballot(),
            },
            5 => Msg::Decided {
                txn,
                outcome: self.random_outcome(),
                participants: self.random_participants(),
            },
            6 => Msg::Finished {
                txn,
                outcome: self.random_outcome(),
            },
            7 => Msg::Prepare {
                txn,
                participants: self.random_participants(),
            },
            _ => Msg::Decide {
                txn,
                outcome: self.random_outcome(),
            },
        }
    }

    /// A message no honest party sends, which a replica must drop without a trace.
    fn malformed_msg(&mut self) -> (ReplicaId, Msg) {
        let txn = self
            .random_txn()
            .filter(|_| self.rng.chance(3, 4))
            .unwrap_or_else(|| TxnId::new(self.rng.below(3) as u32, self.rng.next_u64()));
        let huge = MAX_BALLOT + 1 + self.rng.below(4).max(self.rng.interesting_u64() % 3);
        let huge = if self.rng.bool() { u64::MAX } else { huge };
        let replica = self.rng.below(u64::from(N)) as ReplicaId;
        let outsider = N + self.rng.below(5) as u32;
        match self.rng.below(12) {
            0 => {
                // Some ballot above the limit.
                let mut msg = self.random_msg(txn);
                match &mut msg {
                    Msg::Phase1a { ballot, .. }
                    | Msg::Phase2a { ballot, .. }
                    | Msg::Phase2b { ballot, .. } => *ballot = huge,
                    Msg::Phase1b {
                        ballot, accepted, ..
                    } => {
                        if accepted.is_empty() || self.rng.bool() {
                            *ballot = huge;
                        } else {
                            accepted[0].1 = huge;
                        }
                    }
                    Msg::Nack { promised, .. } => *promised = huge,
                    other => {
                        *other = Msg::Phase1a {
                            txn,
                            ballot: huge,
                            participants: Vec::new(),
                        }
                    }
                }
                (replica, msg)
            }
            1 => {
                // A replica-only message from outside the group.
                let mut msg = self.random_msg(txn);
                if let Msg::Phase2a { ballot, .. } = &mut msg {
                    *ballot = 1 + *ballot % 20;
                }
                (outsider, msg)
            }
            2 => {
                // Phase 1a or 2a with a ballot the sender does not own (or ballot 0 in 1a).
                let ballot = match self.rng.below(3) {
                    0 => 0,
                    _ => {
                        let b = 1 + self.rng.below(30);
                        if ballot_owner(b, N) == replica {
                            b + 1
                        } else {
                            b
                        }
                    }
                };
                let msg = if ballot == 0 || self.rng.bool() {
                    Msg::Phase1a {
                        txn,
                        ballot,
                        participants: self.random_participants(),
                    }
                } else {
                    Msg::Phase2a {
                        txn,
                        participant: self.rng.pick(&AGENTS).to_string(),
                        ballot,
                        vote: self.random_vote(),
                        participants: self.random_participants(),
                    }
                };
                (replica, msg)
            }
            3 => {
                // A vote without R.
                let msg = Msg::Phase2a {
                    txn,
                    participant: self.rng.pick(&AGENTS).to_string(),
                    ballot: 0,
                    vote: self.random_vote(),
                    participants: Vec::new(),
                };
                (replica, msg)
            }
            4 => {
                // A vote for an instance outside the R it carries (or with no name).
                let participants = vec![agent("a"), agent("b")];
                let participant = if self.rng.bool() { "c" } else { "" }.to_string();
                let msg = Msg::Phase2a {
                    txn,
                    participant,
                    ballot: 0,
                    vote: self.random_vote(),
                    participants,
                };
                (replica, msg)
            }
            5 => {
                // A transaction no replica of this group minted: anything at all.
                let foreign = TxnId::new(N + self.rng.below(200) as u32, self.rng.next_u64());
                let msg = self.random_msg(foreign);
                (replica, msg)
            }
            6 => {
                let msg = if self.rng.bool() {
                    Msg::Prepare {
                        txn,
                        participants: self.random_participants(),
                    }
                } else {
                    Msg::Decide {
                        txn,
                        outcome: self.random_outcome(),
                    }
                };
                (replica, msg)
            }
            7 => {
                // A Nack that promises nothing above the ballot it refuses.
                let promised = self.rng.below(10);
                let msg = Msg::Nack {
                    txn,
                    ballot: promised + self.rng.below(3),
                    promised,
                };
                (replica, msg)
            }
            8 => {
                let msg = Msg::Phase1b {
                    txn,
                    ballot: 0,
                    accepted: Vec::new(),
                    participants: self.random_participants(),
                };
                (replica, msg)
            }
            _ => {
                // A vote with an out-of-range ballot and R, from anyone.
                let msg = Msg::Phase2a {
                    txn,
                    participant: self.rng.pick(&AGENTS).to_string(),
                    ballot: huge,
                    vote: self.random_vote(),
                    participants: vec![agent("a"), agent("b"), agent("c")],
                };
                (*self.rng.pick(&[replica, outsider, ReplicaId::MAX]), msg)
            }
        }
    }

    fn malformed(&mut self) {
        let Some(r) = self.random_live() else {
            return;
        };
        let (from, msg) = self.malformed_msg();
        self.log(|| format!("malformed from {from} to {r}: {msg:?}"));
        let now = self.now;
        let Some(replica) = self.replicas[r as usize].as_mut() else {
            return;
        };
        let before = replica.clone();
        *self.stats.entry("malformed messages dropped").or_default() += 1;
        replica.on_message(now, from, msg.clone());
        let outputs = replica.drain();
        if !outputs.is_empty() || *replica != before {
            self.fail(format!(
                "replica {r} did not drop {msg:?} from {from}: {outputs:?}"
            ));
        }
    }

    /// Arbitrary well-formed-or-not messages about the trash transactions, from replicas.
    fn trash(&mut self) {
        let Some(r) = self.random_live() else {
            return;
        };
        let txn = *self.rng.pick(&trash_txns());
        let msg = self.random_msg(txn);
        self.count("trash messages");
        let from = self.rng.below(u64::from(N) + 1) as ReplicaId;
        self.log(|| format!("trash from {from} to {r}: {msg:?}"));
        self.with(r, |rep, now| rep.on_message(now, from, msg));
        if self.rng.chance(1, 4) {
            // A client or an agent asking about it too.
            let p = self.random_participant();
            let ps = self.random_participants();
            let call = self.rng.below(4);
            let _ = self.with(r, |rep, now| match call {
                0 => rep.resolve(now, txn, Some(&p), &ps),
                1 => rep.resolve(now, txn, None, &ps),
                2 => rep.commit(now, txn),
                _ => rep.abort(now, txn),
            });
            if self.rng.bool() {
                self.with(r, |rep, now| rep.on_applied(now, txn, &p));
            }
        }
    }

    // ------------------------------------------------------------------ healing

    /// With every replica up, a reliable network and in-doubt participants asking, every
    /// transaction with an in-doubt participant is decided and they all learn the decision.
    fn heal_and_check_liveness(&mut self) {
        self.log(|| "heal".into());
        for r in 0..N {
            if self.replicas[r as usize].is_none() {
                self.restart(r);
            }
        }
        let takeover = config(0).takeover_after_ms;
        for round in 0..200 {
            for _ in 0..20_000 {
                if self.net.is_empty() {
                    break;
                }
                let env = self.net.remove(0);
                self.deliver(env);
            }
            let waiting: Vec<(TxnId, String)> = self
                .agents
                .iter()
                .filter(|((t, _), a)| !Self::is_trash(*t) && a.in_doubt())
                .map(|(k, _)| k.clone())
                .collect();
            if waiting.is_empty() {
                self.count("cases healed and checked for liveness");
                return;
            }
            if round % 4 == 0 {
                for (txn, p) in &waiting {
                    let r = self.rng.below(u64::from(N)) as ReplicaId;
                    let ps = self.agents[&(*txn, p.clone())].participants.clone();
                    let res = self.with(r, |rep, now| rep.resolve(now, *txn, Some(p), &ps));
                    self.log(|| format!("{p} resolves {txn:?} on {r}: {res:?}"));
                    self.agent_answer(*txn, p, r, res);
                }
            }
            self.advance(takeover / 2);
        }
        let waiting: Vec<String> = self
            .agents
            .iter()
            .filter(|((t, _), a)| !Self::is_trash(*t) && a.in_doubt())
            .map(|((t, p), a)| format!("{p} in {t:?} ({a:?})"))
            .collect();
        self.fail(format!(
            "after healing, participants still in doubt: {waiting:?}"
        ));
    }
}

fn one_case(rng: &mut Rng) -> BTreeMap<&'static str, u64> {
    let mut sim = Sim::new(Rng::new(rng.next_u64()));
    let steps = 20 + rng.below(400);
    for _ in 0..steps {
        sim.step();
    }
    if !sim.near_limit {
        sim.heal_and_check_liveness();
    }
    sim.stats.insert("steps", sim.steps);
    sim.stats
}

#[test]
fn fuzz_replica() {
    let mut total: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut cases = 0u64;
    fuzzkit::run("replica", |rng| {
        cases += 1;
        for (k, v) in one_case(rng) {
            *total.entry(k).or_default() += v;
        }
    });
    println!("fuzz replica: {total:?}");
    if cases >= 200 {
        // Not vacuous: commits, aborts and takeovers all happened.
        for what in [
            "client transactions committed",
            "client transactions aborted",
            "phase 1 rounds started",
            "cases healed and checked for liveness",
        ] {
            assert!(total.get(what).copied().unwrap_or(0) > 0, "no {what}");
        }
    }
}
