//! Model check of the real `Replica` code with stateright.
//!
//! Actors: three coordinator replicas (every one an acceptor; replica 0 leads the one
//! transaction: begun, enlisted and committed in its `on_start`) and two participant agents.
//! Each agent's ballot-0 phase 2a (`participant::vote`, carrying R) is in flight to every
//! acceptor from the start (with `prepare_step`, only once Prepare is delivered). Its value is
//! fixed per initial state and the checker starts from every combination in `Cfg::votes`
//! (both Prepared; one Prepared, one Aborted), so one run covers commits and aborts. With
//! `asks`, a prepared agent may ask one replica for the outcome (`Replica::resolve` with R);
//! with `finishing`, agents apply and confirm every Decide (`on_applied`), so that replicas
//! finish, tell each other and forget.
//!
//! Faults: the network reorders and duplicates (every message sent stays deliverable, so
//! "never delivered" is loss) and, with `lossy`, also drops; up to `max_crashes` of the
//! `crashable` replicas are down at a time, and a replica restarts (at most `max_restarts`
//! times over all, if bounded) with `Replica::recover` from exactly its `Persist` records,
//! saved with `o.save` after each step (`PersistLazy` hints are lost, or with `lazy_survives`
//! kept). Agents do not crash: a restarted agent only asks, which `asks` covers. Each
//! replica's per-transaction timer (`armed()`) is a stateright timer that may fire at any
//! moment, so `now` stays constant, and states that differ only by timer deadlines or the
//! back-off generator are one (`Replica::hash_protocol_state`).
//!
//! Bound: phase-1 rounds started over all replicas, by the `proposers` only (each start
//! persists a new `Record::Round`, so it is counted from the durable records).
//!
//! Properties, over the replicas' durable records and a history of every decision announced
//! (each Decide sent to an agent and each Decided sent to a replica, recorded when sent):
//! * TCConsistent: no two participants (nor one twice) are ever told different outcomes;
//! * each instance chooses at most one value (chosen = accepted in one ballot by a majority,
//!   from the durable Accept records, which only grow: so a chosen value never changes);
//! * commit only if every participant voted Prepared;
//! * an announced decision is the one the chosen values imply; only one is ever announced;
//! * sometimes a commit, an abort, a commit and an abort reached through a takeover (and with
//!   `finishing`, a replica that forgot the finished transaction): the model is not vacuous.
//!
//! CI runs `exhaustive_takeover_and_leader_crash` (2 416 404 states, about 2–3 minutes on two
//! cores) and the mutation test `forgetting_promises_is_caught`; `explore` takes any bounds
//! from `PXC_*` variables.

#[global_allocator]
static ALLOC: mimalloc::MiMalloc = mimalloc::MiMalloc;

use paxos_commit_core::participant;
use paxos_commit_core::{
    Config, Dest, Msg, Outcome, Output, Participant, Record, Replica, ReplicaId, TxnId, Vote,
};
use stateright::actor::{
    model_timeout, Actor, ActorModel, ActorModelState, Envelope, Id, LossyNetwork, Network, Out,
};
use stateright::{Checker, HasDiscoveries, Model, Property};
use std::borrow::Cow;
use std::collections::hash_map::DefaultHasher;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Debug;
use std::hash::{Hash, Hasher};
use std::ops::Deref;
use std::sync::Arc;
use std::time::Instant;

const REPLICAS: u32 = 3;
const AGENTS: [&str; 2] = ["a", "b"];
/// Time never advances: stateright decides when timers fire.
const NOW: u64 = 0;

fn txn() -> TxnId {
    TxnId::new(0, 1)
}

/// R: the first `n` agents.
fn participants(n: usize) -> Vec<Participant> {
    AGENTS[..n]
        .iter()
        .map(|a| Participant::new(*a, ""))
        .collect()
}

fn agent_index(participant: &str) -> usize {
    AGENTS
        .iter()
        .position(|a| *a == participant)
        .expect("known participant")
}

fn agent_actor(index: usize) -> Id {
    Id::from(REPLICAS as usize + index)
}

fn config(id: ReplicaId) -> Config {
    Config::new(id, REPLICAS)
}

fn seed(id: ReplicaId) -> u64 {
    0x5eed + u64::from(id)
}

fn hash_of<T: Hash + ?Sized>(value: &T) -> u64 {
    let mut h = DefaultHasher::new();
    value.hash(&mut h);
    h.finish()
}

/// A value shared between states, hashed once: the checker clones and hashes every state it
/// generates (its fingerprint), and these parts of a state are big and rarely change.
#[derive(Clone)]
struct Shared<T> {
    value: Arc<T>,
    fp: u64,
}

impl<T: Hash> Shared<T> {
    fn new(value: T) -> Shared<T> {
        let fp = hash_of(&value);
        Shared {
            value: Arc::new(value),
            fp,
        }
    }
}

impl<T> Deref for Shared<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.value
    }
}

impl<T: PartialEq> PartialEq for Shared<T> {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.value, &other.value) || (self.fp == other.fp && self.value == other.value)
    }
}

impl<T: Eq> Eq for Shared<T> {}

impl<T> Hash for Shared<T> {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.fp);
    }
}

impl<T: Ord> PartialOrd for Shared<T> {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl<T: Ord> Ord for Shared<T> {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.value.cmp(&other.value)
    }
}

impl<T: Debug> Debug for Shared<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.value.fmt(f)
    }
}

/// What travels between actors.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Wire {
    Core(Shared<Msg>),
    /// Agent → the replica that sent Decide: applied (the shell calls `on_applied`).
    Applied {
        participant: String,
    },
    /// In-doubt agent → a replica: what is the outcome? (`Replica::resolve` with R.)
    Resolve {
        participant: String,
        participants: Vec<Participant>,
    },
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
enum Timer {
    /// The replica's single timer for the transaction.
    Txn(TxnId),
    /// A prepared agent that has heard nothing asks for the outcome.
    AskOutcome,
}

/// Every record a replica ever made durable. A set: replaying records is order-insensitive.
/// Its fingerprint leaves out Promise records below the highest (they replay to the same
/// acceptor, and no property looks at them).
type Durable = Shared<BTreeSet<Record>>;

fn durable_of(records: BTreeSet<Record>) -> Durable {
    let top = records
        .iter()
        .filter_map(|r| match r {
            Record::Promise { ballot, .. } => Some(*ballot),
            _ => None,
        })
        .max();
    let mut h = DefaultHasher::new();
    for r in &records {
        if !matches!(r, Record::Promise { ballot, .. } if Some(*ballot) != top) {
            r.hash(&mut h);
        }
    }
    Shared {
        value: Arc::new(records),
        fp: h.finish(),
    }
}

/// What survives a crash: the records, and how often this replica restarted (bounded by
/// `Cfg::max_restarts`).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct Stored {
    records: Durable,
    restarts: u8,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct ReplicaState {
    replica: Replica,
    durable: Durable,
    restarts: u8,
    /// `Replica::hash_protocol_state`: without timer deadlines and the back-off RNG. Time
    /// never advances in the model and any armed timer may fire, so those cannot change what
    /// happens, and states that differ only by them are one.
    fp: u64,
}

impl Hash for ReplicaState {
    fn hash<H: Hasher>(&self, state: &mut H) {
        state.write_u64(self.fp);
        self.durable.hash(state);
        self.restarts.hash(state);
    }
}

fn replica_fp(replica: &Replica) -> u64 {
    let mut h = DefaultHasher::new();
    replica.hash_protocol_state(&mut h);
    h.finish()
}

fn replica_state(replica: Replica, durable: Durable, restarts: u8) -> ReplicaState {
    ReplicaState {
        fp: replica_fp(&replica),
        replica,
        durable,
        restarts,
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
struct AgentState {
    /// What this agent votes when asked to prepare (set per initial state).
    intent: Vote,
    /// R, from Prepare; non-empty once the agent voted.
    participants: Vec<Participant>,
    /// Outcomes applied (tracked with `finishing`).
    outcomes: BTreeSet<Outcome>,
    asked: bool,
}

impl AgentState {
    fn voted(&self) -> Option<Vote> {
        (!self.participants.is_empty()).then_some(self.intent)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Hash)]
// Actor states are compared and hashed by value across millions of states; boxing the
// large variant would only add an allocation per clone.
#[allow(clippy::large_enum_variant)]
enum State {
    Replica(ReplicaState),
    Agent(AgentState),
}

/// A deliberately broken replica, to show that the checker finds what it should.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
enum Bug {
    None,
    /// On restart, replays its log without the Promise records: an acceptor that forgets the
    /// ballots it promised.
    ForgetPromises,
    /// Restarts with its acceptor state lost (as `rejoin` does) but without
    /// `Record::Rejoined`: an operator who wiped a damaged log and started the replica as new.
    LoseLog,
}

/// The knobs of one model run.
#[derive(Clone, Copy, Debug)]
struct Cfg {
    /// Phase-1 rounds (takeover ballots) that may be started, over all replicas.
    max_rounds: usize,
    /// The replicas allowed to start a phase 1 (bit i: replica i).
    proposers: u32,
    /// Replicas down at the same time.
    max_crashes: usize,
    /// The replicas that may crash (bit i: replica i).
    crashable: u32,
    /// Restarts over all replicas (crash/recover cycles), if bounded; a crash needs no
    /// restart.
    max_restarts: Option<usize>,
    /// Drop actions on top of never delivering: more states, no new behaviour.
    lossy: bool,
    /// Every message stays deliverable after delivery (stateright's duplicating network);
    /// otherwise each send is delivered at most once.
    duplicating: bool,
    /// `PersistLazy` records survive a crash too.
    lazy_survives: bool,
    /// A prepared agent in doubt may ask a replica for the outcome (`resolve`).
    asks: bool,
    /// Life after the decision: agents apply and confirm each Decide, replicas finish, tell
    /// each other, push the decision again and forget it after retention. When off, agents
    /// ignore Decide and a replica's timer does nothing once it knows the decision; this
    /// cannot hide a wrong decision, since announcements are checked when sent.
    finishing: bool,
    /// Participants (agents) in R: 1 or 2.
    agents: usize,
    /// The initial vote combinations (agent a's, agent b's; the first `agents` are used).
    votes: &'static [[Vote; 2]],
    /// Agents vote when Prepare arrives; otherwise their votes are in flight from the start
    /// (the leader commits in its `on_start`, so that only removes the Prepare deliveries
    /// from the interleavings: a vote may still arrive at any time, or never).
    prepare_step: bool,
    /// Every restart loses the acceptor state (a damaged log moved aside) and rejoins under
    /// `Record::Rejoined`, as `coordinator --rejoin` does; the records it had stay in the
    /// history the properties read, since what it accepted before still counts.
    rejoin: bool,
    /// Every restart loses the acceptor state and comes back as the shell starts a new log:
    /// under a new `Record::Incarnation`, not admitted. Its peers remember its earlier life
    /// and refuse its join (`admission`), so it is never admitted: the model shows that an
    /// unadmitted replica cannot break a property, whatever it receives.
    refused: bool,
    bug: Bug,
}

#[derive(Clone, Debug)]
enum Node {
    Replica(Cfg),
    Agent(Cfg),
}

fn replica_of(state: &State) -> &ReplicaState {
    match state {
        State::Replica(r) => r,
        State::Agent(_) => unreachable!("a replica's state"),
    }
}

fn agent_of(state: &State) -> &AgentState {
    match state {
        State::Agent(a) => a,
        State::Replica(_) => unreachable!("an agent's state"),
    }
}

fn stored(st: &ReplicaState) -> Stored {
    Stored {
        records: st.durable.clone(),
        restarts: st.restarts,
    }
}

fn insert(set: &mut Durable, record: Record) -> bool {
    if set.contains(&record) {
        return false;
    }
    let mut records = (*set.value).clone();
    records.insert(record);
    *set = durable_of(records);
    true
}

/// Routes a replica's outputs; returns whether the durable record set grew.
fn emit(st: &mut ReplicaState, outputs: Vec<Output>, cfg: &Cfg, o: &mut Out<Node>) -> bool {
    let mut grew = false;
    for output in outputs {
        match output {
            Output::Persist(record) => grew |= insert(&mut st.durable, record),
            Output::PersistLazy(record) => {
                if cfg.lazy_survives {
                    grew |= insert(&mut st.durable, record);
                }
            }
            Output::Send { to, msg } => {
                let dst = match to {
                    Dest::Replica(r) => Id::from(r as usize),
                    Dest::Agent(p) => agent_actor(agent_index(&p.id)),
                };
                o.send(dst, Wire::Core(Shared::new(msg)));
            }
            Output::Decided { .. } | Output::Finished { .. } => {}
        }
    }
    grew
}

/// One step of a replica: `f` drives the real core; outputs, storage and timers follow.
fn replica_step(
    cfg: &Cfg,
    state: &mut Cow<State>,
    o: &mut Out<Node>,
    fired: Option<TxnId>,
    f: impl FnOnce(&mut Replica),
) {
    let current = replica_of(state);
    let mut next = current.clone();
    let before: BTreeSet<TxnId> = next.replica.armed().filter(|t| Some(*t) != fired).collect();
    f(&mut next.replica);
    let outputs = next.replica.drain();
    if next == *current && outputs.is_empty() && fired.is_none() {
        return; // a no-op (typically a duplicate)
    }
    if emit(&mut next, outputs, cfg, o) {
        o.save(stored(&next));
    }
    let changed = next.replica != current.replica || next.durable != current.durable;
    if changed {
        next.fp = replica_fp(&next.replica);
    }
    let after: BTreeSet<TxnId> = next.replica.armed().collect();
    for t in after.difference(&before) {
        o.set_timer(Timer::Txn(*t), model_timeout());
    }
    for t in before.difference(&after) {
        o.cancel_timer(Timer::Txn(*t));
    }
    if changed {
        *state = Cow::Owned(State::Replica(next));
    }
}

impl Actor for Node {
    type Msg = Wire;
    type Timer = Timer;
    type State = State;
    type Storage = Stored;
    type Random = ();

    fn on_start(&self, id: Id, storage: &Option<Stored>, o: &mut Out<Self>) -> State {
        let Node::Replica(cfg) = self else {
            // The intent is set per initial state by `PaxosCommitModel::init_states`.
            return State::Agent(AgentState {
                intent: Vote::Prepared,
                participants: Vec::new(),
                outcomes: BTreeSet::new(),
                asked: false,
            });
        };
        let rid = usize::from(id) as ReplicaId;
        let mut st = match storage {
            None => {
                // First start: replica 0 leads the one transaction and commits it at once.
                let mut replica = Replica::new(config(rid), seed(rid));
                if rid == 0 {
                    let t = replica.begin(NOW, 1);
                    assert_eq!(t, txn());
                    for p in participants(cfg.agents) {
                        replica.enlist(NOW, t, p).expect("enlist");
                    }
                    assert_eq!(replica.commit(NOW, t), Ok(None));
                }
                // Saved even empty: a restart is then told apart from the first start.
                let st = replica_state(replica, durable_of(BTreeSet::new()), 0);
                o.save(stored(&st));
                st
            }
            Some(Stored { records, restarts }) => {
                let lose_log = cfg.rejoin || cfg.refused || cfg.bug == Bug::LoseLog;
                let replay: Vec<Record> = cfg
                    .rejoin
                    .then_some(Record::Rejoined)
                    .into_iter()
                    .chain(cfg.refused.then_some(Record::Incarnation {
                        incarnation: 1 + u64::from(*restarts),
                    }))
                    .chain(records.iter().cloned())
                    .filter(|r| match r {
                        Record::Promise { .. } => !lose_log && cfg.bug != Bug::ForgetPromises,
                        Record::Accept { .. } | Record::Round { .. } => !lose_log,
                        _ => true,
                    })
                    .collect();
                let st = replica_state(
                    Replica::recover(config(rid), seed(rid), &replay, NOW),
                    records.clone(),
                    // Counted only when bounded: a counter would tell apart states that
                    // are otherwise one.
                    restarts + u8::from(cfg.max_restarts.is_some()),
                );
                o.save(stored(&st));
                st
            }
        };
        let outputs = st.replica.drain();
        emit(&mut st, outputs, cfg, o);
        for t in st.replica.armed() {
            o.set_timer(Timer::Txn(t), model_timeout());
        }
        State::Replica(st)
    }

    fn on_msg(&self, id: Id, state: &mut Cow<State>, src: Id, msg: Wire, o: &mut Out<Self>) {
        match self {
            Node::Replica(cfg) => {
                let t = txn();
                replica_step(cfg, state, o, None, |replica| match msg {
                    Wire::Core(m) => {
                        replica.on_message(NOW, usize::from(src) as ReplicaId, (*m).clone())
                    }
                    Wire::Applied { participant } => replica.on_applied(NOW, t, &participant),
                    Wire::Resolve {
                        participant,
                        participants,
                    } => {
                        let _ = replica.resolve(NOW, t, Some(&participant), &participants);
                    }
                });
            }
            Node::Agent(cfg) => {
                let me = AGENTS[usize::from(id) - REPLICAS as usize];
                let st = agent_of(state);
                let Wire::Core(m) = msg else {
                    unreachable!("agents get core messages")
                };
                match &*m {
                    Msg::Prepare { participants, .. } => {
                        if !st.participants.is_empty() {
                            return; // duplicate: already voted
                        }
                        let mut next = st.clone();
                        next.participants = participants.clone();
                        let votes =
                            participant::vote(txn(), me, next.intent, participants, REPLICAS);
                        for (r, vote) in votes {
                            o.send(Id::from(r as usize), Wire::Core(Shared::new(vote)));
                        }
                        if cfg.asks && next.intent == Vote::Prepared {
                            o.set_timer(Timer::AskOutcome, model_timeout());
                        }
                        *state = Cow::Owned(State::Agent(next));
                    }
                    Msg::Decide { outcome, .. } => {
                        if !cfg.finishing {
                            return;
                        }
                        if !st.outcomes.contains(outcome) {
                            let mut next = st.clone();
                            next.outcomes.insert(*outcome);
                            *state = Cow::Owned(State::Agent(next));
                        }
                        o.cancel_timer(Timer::AskOutcome);
                        o.send(
                            src,
                            Wire::Applied {
                                participant: me.to_string(),
                            },
                        );
                    }
                    other => unreachable!("agent got {other:?}"),
                }
            }
        }
    }

    fn on_timeout(&self, id: Id, state: &mut Cow<State>, timer: &Timer, o: &mut Out<Self>) {
        match (self, timer) {
            (Node::Replica(cfg), Timer::Txn(t)) => {
                let t = *t;
                if !cfg.finishing && replica_of(state).replica.status(t).decided.is_some() {
                    o.set_timer(Timer::Txn(t), model_timeout()); // stays armed, does nothing
                    return;
                }
                replica_step(cfg, state, o, Some(t), |replica| replica.on_timer(NOW, t));
            }
            (Node::Agent(_), Timer::AskOutcome) => {
                let st = agent_of(state);
                if st.asked || !st.outcomes.is_empty() {
                    return;
                }
                let me = usize::from(id) - REPLICAS as usize;
                // Each agent asks one replica other than the leader (a → 1, b → 2).
                o.send(
                    Id::from(1 + me % (REPLICAS as usize - 1)),
                    Wire::Resolve {
                        participant: AGENTS[me].to_string(),
                        participants: st.participants.clone(),
                    },
                );
                let mut next = st.clone();
                next.asked = true;
                *state = Cow::Owned(State::Agent(next));
            }
            _ => {}
        }
    }

    fn name(&self) -> String {
        match self {
            Node::Replica(_) => "replica".into(),
            Node::Agent(_) => "agent".into(),
        }
    }
}

/// Every decision announced, recorded when its message was sent.
#[derive(Clone, Debug, Default, PartialEq, Eq, Hash)]
struct History {
    /// Outcomes sent to agents (Decide).
    decide: BTreeSet<Outcome>,
    /// Outcomes sent to replicas (Decided).
    decided: BTreeSet<Outcome>,
}

impl History {
    fn announced(&self, outcome: Outcome) -> bool {
        self.decide.contains(&outcome) || self.decided.contains(&outcome)
    }
}

type Sys = ActorModel<Node, Cfg, History>;
type SysState = ActorModelState<Node, History>;

fn record_out(_: &Cfg, history: &History, env: Envelope<&Wire>) -> Option<History> {
    let Wire::Core(m) = env.msg else {
        return None;
    };
    let mut h = history.clone();
    let grew = match **m {
        Msg::Decide { outcome, .. } => h.decide.insert(outcome),
        Msg::Decided { outcome, .. } => h.decided.insert(outcome),
        _ => false,
    };
    grew.then_some(h)
}

fn agents(state: &SysState) -> impl Iterator<Item = &AgentState> {
    state.actor_states.iter().filter_map(|s| match &**s {
        State::Agent(a) => Some(a),
        State::Replica(_) => None,
    })
}

fn durable(state: &SysState) -> impl Iterator<Item = (usize, &Durable)> {
    state
        .actor_storages
        .iter()
        .enumerate()
        .filter_map(|(i, s)| s.as_ref().map(|s| (i, &s.records)))
}

fn restarts(state: &SysState) -> usize {
    state
        .actor_storages
        .iter()
        .flatten()
        .map(|s| usize::from(s.restarts))
        .sum()
}

/// Instance → values chosen (accepted by a majority in one ballot), from the durable records.
fn chosen(state: &SysState) -> BTreeMap<String, BTreeSet<Vote>> {
    let mut acceptors: BTreeMap<(&str, u64, Vote), BTreeSet<usize>> = BTreeMap::new();
    for (i, records) in durable(state) {
        for r in records.iter() {
            if let Record::Accept {
                participant,
                ballot,
                vote,
                ..
            } = r
            {
                acceptors
                    .entry((participant.as_str(), *ballot, *vote))
                    .or_default()
                    .insert(i);
            }
        }
    }
    let mut out: BTreeMap<String, BTreeSet<Vote>> = BTreeMap::new();
    for ((p, _, v), who) in acceptors {
        if who.len() > REPLICAS as usize / 2 {
            out.entry(p.to_string()).or_default().insert(v);
        }
    }
    out
}

fn rounds_started(state: &SysState) -> usize {
    durable(state)
        .map(|(_, records)| {
            records
                .iter()
                .filter(|r| matches!(r, Record::Round { round } if *round > 0))
                .count()
        })
        .sum()
}

fn actor_model(cfg: Cfg) -> Sys {
    ActorModel::new(cfg, History::default())
        .actors((0..REPLICAS).map(|_| Node::Replica(cfg)))
        .actors((0..cfg.agents).map(|_| Node::Agent(cfg)))
        .init_network(if cfg.duplicating {
            Network::new_unordered_duplicating([])
        } else {
            Network::new_unordered_nonduplicating([])
        })
        .lossy_network(if cfg.lossy {
            LossyNetwork::Yes
        } else {
            LossyNetwork::No
        })
        .max_crashes(cfg.max_crashes)
        .record_msg_out(record_out)
        .within_boundary(|cfg, state| {
            rounds_started(state) <= cfg.max_rounds
                && cfg.max_restarts.is_none_or(|max| restarts(state) <= max)
                && durable(state).all(|(i, records)| {
                    cfg.proposers & (1 << i) != 0
                        || !records.iter().any(|r| matches!(r, Record::Round { .. }))
                })
                && state
                    .crashed
                    .iter()
                    .enumerate()
                    .all(|(i, c)| !c || cfg.crashable & (1 << i) != 0)
        })
}

/// The `ActorModel`, started from each vote combination, with one normalisation: stateright's
/// duplicating network remembers the last envelope delivered, only so that a delivery that
/// changes nothing still yields a new fingerprint (for histories recorded on receipt). Ours is
/// recorded on send and no property looks at it, so forgetting it merges states that differ
/// only by it: fewer states, the same behaviours.
struct PaxosCommitModel(Sys);

fn normalise(mut state: SysState) -> SysState {
    if let Network::UnorderedDuplicating(_, last) = &mut state.network {
        *last = None;
    }
    state
}

impl Model for PaxosCommitModel {
    type State = SysState;
    type Action = <Sys as Model>::Action;

    fn init_states(&self) -> Vec<SysState> {
        let mut out = Vec::new();
        for init in self.0.init_states() {
            for votes in self.0.cfg.votes {
                let mut s = init.clone();
                for (i, vote) in votes.iter().take(self.0.cfg.agents).enumerate() {
                    let index = REPLICAS as usize + i;
                    let mut agent = agent_of(&s.actor_states[index]).clone();
                    agent.intent = *vote;
                    if !self.0.cfg.prepare_step {
                        agent.participants = participants(self.0.cfg.agents);
                        let msgs = participant::vote(
                            txn(),
                            AGENTS[i],
                            *vote,
                            &agent.participants,
                            REPLICAS,
                        );
                        let envelopes = msgs.into_iter().map(|(r, m)| Envelope {
                            src: agent_actor(i),
                            dst: Id::from(r as usize),
                            msg: Wire::Core(Shared::new(m)),
                        });
                        match &mut s.network {
                            Network::UnorderedDuplicating(set, _) => set.extend(envelopes),
                            Network::UnorderedNonDuplicating(multiset) => {
                                for e in envelopes {
                                    *multiset.entry(e).or_default() += 1;
                                }
                            }
                            Network::Ordered(_) => unreachable!("unordered networks only"),
                        }
                        if self.0.cfg.asks && *vote == Vote::Prepared {
                            s.timers_set[index].set(Timer::AskOutcome);
                        }
                    }
                    s.actor_states[index] = Arc::new(State::Agent(agent));
                }
                out.push(normalise(s));
            }
        }
        out
    }

    fn actions(&self, state: &SysState, actions: &mut Vec<Self::Action>) {
        self.0.actions(state, actions)
    }

    fn next_state(&self, state: &SysState, action: Self::Action) -> Option<SysState> {
        self.0.next_state(state, action).map(normalise)
    }

    fn format_action(&self, action: &Self::Action) -> String {
        self.0.format_action(action)
    }

    fn format_step(&self, state: &SysState, action: Self::Action) -> Option<String> {
        self.0.format_step(state, action)
    }

    fn within_boundary(&self, state: &SysState) -> bool {
        Model::within_boundary(&self.0, state)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        let mut properties = vec![
            Property::always("TCConsistent", |_, s: &SysState| {
                s.history.decide.len() <= 1
                    && !(agents(s).any(|a| a.outcomes.contains(&Outcome::Committed))
                        && agents(s).any(|a| a.outcomes.contains(&Outcome::Aborted)))
            }),
            Property::always(
                "each instance chooses at most one value",
                |_, s: &SysState| chosen(s).values().all(|vs| vs.len() <= 1),
            ),
            Property::always(
                "commit only if every participant voted Prepared",
                |_, s: &SysState| {
                    !s.history.announced(Outcome::Committed)
                        || agents(s).all(|a| a.voted() == Some(Vote::Prepared))
                },
            ),
            Property::always(
                "an announced decision is the one the chosen values imply",
                |_, s: &SysState| {
                    let chosen = chosen(s);
                    let n = s.actor_states.len() - REPLICAS as usize;
                    let all_prepared = AGENTS[..n].iter().all(|a| {
                        chosen
                            .get(*a)
                            .is_some_and(|vs| vs.contains(&Vote::Prepared))
                    });
                    let some_aborted = chosen.values().any(|vs| vs.contains(&Vote::Aborted));
                    (!s.history.announced(Outcome::Committed) || all_prepared)
                        && (!s.history.announced(Outcome::Aborted) || some_aborted)
                },
            ),
            Property::always("only one decision is announced", |_, s: &SysState| {
                !(s.history.announced(Outcome::Committed) && s.history.announced(Outcome::Aborted))
            }),
            Property::sometimes("a commit", |_, s: &SysState| {
                s.history.decide.contains(&Outcome::Committed)
            }),
            Property::sometimes("an abort", |_, s: &SysState| {
                s.history.decide.contains(&Outcome::Aborted)
            }),
        ];
        if self.0.cfg.max_rounds > 0 {
            properties.push(Property::sometimes(
                "a commit through a takeover",
                |_, s: &SysState| {
                    rounds_started(s) > 0 && s.history.decide.contains(&Outcome::Committed)
                },
            ));
            properties.push(Property::sometimes(
                "an abort through a takeover",
                |_, s: &SysState| {
                    rounds_started(s) > 0 && s.history.decide.contains(&Outcome::Aborted)
                },
            ));
        }
        if self.0.cfg.finishing {
            properties.push(Property::sometimes(
                "a replica forgot the finished transaction",
                |_, s: &SysState| {
                    s.actor_states.iter().any(|a| match &**a {
                        State::Replica(r) => r.replica.status(txn()).expired,
                        State::Agent(_) => false,
                    })
                },
            ));
        }
        properties
    }
}

fn model(cfg: Cfg) -> PaxosCommitModel {
    PaxosCommitModel(actor_model(cfg))
}

fn threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn check(cfg: Cfg) -> impl Checker<PaxosCommitModel> {
    let start = Instant::now();
    let checker = model(cfg).checker().threads(threads()).spawn_bfs();
    let mut last = Instant::now();
    while !checker.is_done() {
        std::thread::sleep(std::time::Duration::from_millis(200));
        if last.elapsed().as_secs() >= 15 {
            last = Instant::now();
            println!(
                "  ... {} unique states after {:.0?}",
                checker.unique_state_count(),
                start.elapsed()
            );
        }
    }
    let checker = checker.join();
    println!(
        "{cfg:?}\n  {} unique states ({} generated, max depth {}) in {:.1?}",
        checker.unique_state_count(),
        checker.state_count(),
        checker.max_depth(),
        start.elapsed()
    );
    checker
}

const BOTH_WAYS: &[[Vote; 2]] = &[
    [Vote::Prepared, Vote::Prepared],
    [Vote::Prepared, Vote::Aborted],
];

/// A bound from the environment (`PXC_*`), or its default.
fn var(key: &str, default: usize) -> usize {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn env_cfg() -> Cfg {
    Cfg {
        max_rounds: var("PXC_ROUNDS", 2),
        proposers: var("PXC_PROPOSERS", 7) as u32,
        max_crashes: var("PXC_CRASHES", 1),
        crashable: var("PXC_CRASHABLE", 0b111) as u32,
        max_restarts: std::env::var("PXC_RESTARTS")
            .ok()
            .and_then(|v| v.parse().ok()),
        lossy: var("PXC_LOSSY", 0) == 1,
        duplicating: var("PXC_DUP", 1) == 1,
        prepare_step: var("PXC_PREPARE", 0) == 1,
        lazy_survives: var("PXC_LAZY", 0) == 1,
        asks: var("PXC_ASKS", 1) == 1,
        finishing: var("PXC_FINISHING", 0) == 1,
        agents: var("PXC_AGENTS", 2),
        votes: if var("PXC_PA", 1) == 1 {
            BOTH_WAYS
        } else {
            &[[Vote::Prepared, Vote::Prepared]]
        },
        rejoin: var("PXC_REJOIN", 0) == 1,
        refused: var("PXC_REFUSED", 0) == 1,
        bug: match var("PXC_BUG", 0) {
            1 => Bug::ForgetPromises,
            2 => Bug::LoseLog,
            _ => Bug::None,
        },
    }
}

/// Any configuration, from the environment (for exploring bounds), e.g.
/// `PXC_ROUNDS=2 PXC_CRASHES=1 cargo test -p paxos-commit-core --test model -- --ignored
/// --nocapture explore`.
#[test]
#[ignore]
fn explore() {
    let cfg = env_cfg();
    let depth = var("PXC_DEPTH", 0);
    if depth > 0 {
        for d in 1..=depth {
            let start = Instant::now();
            let c = model(cfg)
                .checker()
                .threads(threads())
                .target_max_depth(d)
                .spawn_bfs()
                .join();
            println!(
                "depth {d}: {} unique in {:.1?}",
                c.unique_state_count(),
                start.elapsed()
            );
        }
        return;
    }
    check(cfg).assert_properties();
}

/// The exhaustive check CI runs (a few minutes on 2 cores): 2 participants × 3 acceptors;
/// both agents Prepared, or one Prepared and one Aborted; ballot 0 plus one takeover ballot
/// (replica 1's); the leader (replica 0, also an acceptor) crashes at any moment and restarts
/// once from its `Persist` records; every message may be reordered, duplicated or never
/// delivered. Every state in those bounds is visited and every property holds.
#[test]
fn exhaustive_takeover_and_leader_crash() {
    let checker = check(ci_bounds());
    checker.assert_properties();
    assert!(
        checker.unique_state_count() > 1_000_000,
        "bounds too small to mean much"
    );
}

/// The bounds of the exhaustive run in CI.
fn ci_bounds() -> Cfg {
    Cfg {
        max_rounds: 1,
        proposers: 0b010,
        max_crashes: 1,
        crashable: 0b001,
        max_restarts: Some(1),
        lossy: false,
        duplicating: true,
        prepare_step: false,
        lazy_survives: false,
        asks: false,
        finishing: false,
        agents: 2,
        votes: BOTH_WAYS,
        rejoin: false,
        refused: false,
        bug: Bug::None,
    }
}

/// The bounds of the rejoin runs: any replica may lose its log once (replica 0 is the
/// leader; replica 1 also runs the takeover), with both agents voting Prepared.
fn rejoin_bounds() -> Cfg {
    Cfg {
        crashable: 0b011,
        votes: &[[Vote::Prepared, Vote::Prepared]],
        ..ci_bounds()
    }
}

/// A replica that lost its log and rejoined (`--rejoin`: acceptor state gone, answering only
/// for transactions begun after) never lets two outcomes be chosen, whichever replica it is
/// and whenever it loses the log.
#[test]
fn a_replica_that_rejoins_after_losing_its_log_keeps_every_property() {
    let start = Instant::now();
    let checker = check(Cfg {
        rejoin: true,
        ..rejoin_bounds()
    });
    checker.assert_properties();
    println!(
        "rejoin: {} unique states in {:.1?}",
        checker.unique_state_count(),
        start.elapsed()
    );
}

/// A replica that lost its log and started on a new one, refused by its peers (so never
/// admitted), answers nothing that could break a property, however messages reach it.
#[test]
fn a_replica_on_a_new_log_that_is_never_admitted_keeps_every_property() {
    let start = Instant::now();
    let checker = check(Cfg {
        refused: true,
        ..rejoin_bounds()
    });
    checker.assert_properties();
    println!(
        "refused: {} unique states in {:.1?}",
        checker.unique_state_count(),
        start.elapsed()
    );
}

/// The same loss without the rejoin fence is caught: the fence is what makes it safe.
#[test]
fn losing_the_log_without_rejoining_is_caught() {
    let found = first_violations(
        "lost log",
        Cfg {
            bug: Bug::LoseLog,
            ..rejoin_bounds()
        },
    );
    assert!(
        !found.is_empty(),
        "the checker missed an acceptor that lost its log"
    );
}

/// The checker finds the violation an acceptor that forgets its promises causes.
#[test]
fn forgetting_promises_is_caught() {
    let cfg = Cfg {
        proposers: 0b111,
        crashable: 0b111,
        max_restarts: None,
        votes: &[[Vote::Prepared, Vote::Prepared]],
        bug: Bug::ForgetPromises,
        ..ci_bounds()
    };
    let found = first_violations("forgetful acceptor", cfg);
    assert!(!found.is_empty(), "the checker missed a forgetful acceptor");
}

/// Explores `cfg` until the first failure; prints what failed and the path to it.
fn first_violations(what: &str, cfg: Cfg) -> Vec<&'static str> {
    let start = Instant::now();
    let checker = model(cfg)
        .checker()
        .threads(threads())
        .finish_when(HasDiscoveries::AnyFailures)
        .spawn_bfs()
        .join();
    let found = safety_violations(&checker);
    println!(
        "{what}: {found:?} after {} unique states in {:.1?}",
        checker.unique_state_count(),
        start.elapsed()
    );
    if let Some(path) = found.first().and_then(|f| checker.discovery(f)) {
        for action in path.into_actions() {
            println!("  {action:?}");
        }
    }
    found
}

/// The safety properties a run found violated.
fn safety_violations(checker: &impl Checker<PaxosCommitModel>) -> Vec<&'static str> {
    checker
        .discoveries()
        .into_keys()
        .filter(|name| {
            matches!(
                *name,
                "TCConsistent"
                    | "each instance chooses at most one value"
                    | "an announced decision is the one the chosen values imply"
                    | "only one decision is announced"
            )
        })
        .collect()
}

/// How many distinct local states each actor has over the explored space (bounds tuning).
#[test]
#[ignore]
fn census() {
    use std::sync::Mutex;
    let cfg = env_cfg();
    let seen: Arc<Mutex<Vec<BTreeMap<u64, String>>>> = Arc::new(Mutex::new(vec![
        BTreeMap::new();
        REPLICAS as usize
            + cfg.agents
    ]));
    let nets: Arc<Mutex<BTreeSet<u64>>> = Arc::default();
    let (s2, n2) = (seen.clone(), nets.clone());
    let c = model(cfg)
        .checker()
        .threads(threads())
        .visitor(
            move |p: stateright::Path<SysState, <Sys as Model>::Action>| {
                let last = p.last_state();
                let mut seen = s2.lock().expect("lock");
                for (i, a) in last.actor_states.iter().enumerate() {
                    seen[i]
                        .entry(hash_of(&**a))
                        .or_insert_with(|| format!("{a:?}"));
                }
                n2.lock().expect("lock").insert(hash_of(&last.network));
            },
        )
        .spawn_bfs()
        .join();
    println!("{} unique", c.unique_state_count());
    for (i, s) in seen.lock().expect("lock").iter().enumerate() {
        println!("actor {i}: {} local states", s.len());
    }
    println!("networks: {}", nets.lock().expect("lock").len());
    if std::env::var("PXC_DUMP").is_ok() {
        for s in seen.lock().expect("lock")[0].values().take(40) {
            println!("{s}\n");
        }
    }
}
