//! Scenario tests: the real `Replica` code driven over a tiny deterministic simulated network.
//!
//! The network is a FIFO queue of `(from, to, message)` with explicit delivery, drop and
//! duplication. A crash throws a replica's memory away (including its `PersistLazy` hints);
//! recovery rebuilds it with `Replica::recover` from the `Persist` records alone, unless a test
//! asks to keep the hints. Agents are scripted: on Prepare they answer with
//! `participant::vote` (or stay silent), on Decide they record the outcome and confirm it
//! (the shell's `on_applied`).
//!
//! Counting convention (see `message_and_write_counts`): only `Output::Send` leaves a replica.
//! A message a replica addresses to itself (its own 2b, Decided, Finished, 1a/1b) is delivered
//! internally within the same step and never appears as an output, so the tables count network
//! messages; the loopback deliveries are given separately, derived from the protocol.

use paxos_commit_core::participant;
use paxos_commit_core::{Config, LocalStatus};
use paxos_commit_core::{
    Dest, Msg, Outcome, Output, Participant, Record, Replica, ReplicaId, TxnId, Vote,
};
use std::collections::{BTreeMap, VecDeque};

// ---------------------------------------------------------------------------- the simulator

#[derive(Debug, Clone, PartialEq, Eq)]
enum Node {
    Replica(ReplicaId),
    Agent(String),
}

/// What travels: the core's messages, plus the agent's confirmation that it applied a decision
/// (an RPC reply in the real system, fed to `Replica::on_applied`).
#[derive(Debug, Clone, PartialEq, Eq)]
enum Wire {
    Core(Msg),
    Applied { txn: TxnId, participant: String },
}

#[derive(Debug, Clone)]
struct Envelope {
    from: Node,
    to: Node,
    wire: Wire,
}

/// How a scripted agent answers Prepare.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Policy {
    Vote(Vote),
    /// Does not know whether it prepared (or is down): sends nothing.
    Silent,
}

#[derive(Debug, Clone)]
struct Agent {
    participant: Participant,
    policy: Policy,
    /// R as the agent learned it from Prepare.
    participants: Vec<Participant>,
    voted: Option<Vote>,
    outcomes: Vec<Outcome>,
}

#[derive(Debug, Default, Clone)]
struct Counts {
    /// Network messages by kind.
    sent: BTreeMap<&'static str, usize>,
    /// Eager (`Persist`) records per replica.
    persist: Vec<usize>,
    /// Steps that produced at least one `Persist` (one fsync each without cross-step batching).
    persist_batches: Vec<usize>,
    /// `PersistLazy` records per replica.
    lazy: Vec<usize>,
}

struct Sim {
    n: u32,
    now: u64,
    cfgs: Vec<Config>,
    replicas: Vec<Option<Replica>>,
    durable: Vec<Vec<Record>>,
    lazy: Vec<Vec<Record>>,
    agents: BTreeMap<String, Agent>,
    queue: VecDeque<Envelope>,
    /// `Output::Decided` / `Output::Finished` per replica, in order.
    events: Vec<(ReplicaId, Output)>,
    counts: Counts,
}

fn kind(msg: &Msg) -> &'static str {
    match msg {
        Msg::Phase1a { .. } => "1a",
        Msg::Phase1b { .. } => "1b",
        Msg::Phase2a { ballot: 0, .. } => "2a (ballot 0, vote)",
        Msg::Phase2a { .. } => "2a (ballot > 0)",
        Msg::Phase2b { ballot: 0, .. } => "2b (ballot 0)",
        Msg::Phase2b { .. } => "2b (ballot > 0)",
        Msg::Nack { .. } => "Nack",
        Msg::Decided { .. } => "Decided (replica)",
        Msg::Finished { .. } => "Finished (replica)",
        Msg::Prepare { .. } => "Prepare (agent)",
        Msg::Decide { .. } => "Decide (agent)",
    }
}

impl Sim {
    fn new(replicas: u32, agents: &[(&str, Policy)]) -> Sim {
        let cfgs: Vec<Config> = (0..replicas).map(|id| Config::new(id, replicas)).collect();
        Sim {
            n: replicas,
            now: 1_000,
            replicas: cfgs
                .iter()
                .map(|c| Some(Replica::new(c.clone(), 7 + u64::from(c.id))))
                .collect(),
            cfgs,
            durable: vec![Vec::new(); replicas as usize],
            lazy: vec![Vec::new(); replicas as usize],
            agents: agents
                .iter()
                .map(|(id, policy)| {
                    let p = Participant::new(*id, format!("{id}:5432"));
                    (
                        id.to_string(),
                        Agent {
                            participant: p,
                            policy: *policy,
                            participants: Vec::new(),
                            voted: None,
                            outcomes: Vec::new(),
                        },
                    )
                })
                .collect(),
            queue: VecDeque::new(),
            events: Vec::new(),
            counts: Counts {
                persist: vec![0; replicas as usize],
                persist_batches: vec![0; replicas as usize],
                lazy: vec![0; replicas as usize],
                ..Counts::default()
            },
        }
    }

    fn participant(&self, id: &str) -> Participant {
        self.agents[id].participant.clone()
    }

    fn replica(&self, r: ReplicaId) -> &Replica {
        self.replicas[r as usize].as_ref().expect("replica is up")
    }

    /// Runs `f` on replica `r` and routes what it produced.
    fn with<T>(&mut self, r: ReplicaId, f: impl FnOnce(&mut Replica, u64) -> T) -> T {
        let now = self.now;
        let replica = self.replicas[r as usize].as_mut().expect("replica is up");
        let result = f(replica, now);
        let outputs = replica.drain();
        self.absorb(r, outputs);
        result
    }

    fn absorb(&mut self, r: ReplicaId, outputs: Vec<Output>) {
        let i = r as usize;
        let mut persisted = false;
        for output in outputs {
            match output {
                Output::Persist(record) => {
                    self.counts.persist[i] += 1;
                    persisted = true;
                    self.durable[i].push(record);
                }
                Output::PersistLazy(record) => {
                    self.counts.lazy[i] += 1;
                    self.lazy[i].push(record);
                }
                Output::Send { to, msg } => {
                    *self.counts.sent.entry(kind(&msg)).or_default() += 1;
                    let to = match to {
                        Dest::Replica(to) => {
                            assert_ne!(to, r, "a replica's message to itself is loopback");
                            Node::Replica(to)
                        }
                        Dest::Agent(p) => Node::Agent(p.id),
                    };
                    self.queue.push_back(Envelope {
                        from: Node::Replica(r),
                        to,
                        wire: Wire::Core(msg),
                    });
                }
                other => self.events.push((r, other)),
            }
        }
        if persisted {
            self.counts.persist_batches[i] += 1;
        }
    }

    /// Agent `id` sends its ballot-0 vote to the acceptors (optionally only to some).
    fn vote(&mut self, id: &str, txn: TxnId, vote: Vote, only: Option<&[ReplicaId]>) {
        let agent = self.agents.get_mut(id).expect("agent");
        agent.voted = Some(vote);
        let participants = agent.participants.clone();
        for (r, msg) in participant::vote(txn, id, vote, &participants, self.n) {
            if only.is_some_and(|o| !o.contains(&r)) {
                continue;
            }
            *self.counts.sent.entry(kind(&msg)).or_default() += 1;
            self.queue.push_back(Envelope {
                from: Node::Agent(id.to_string()),
                to: Node::Replica(r),
                wire: Wire::Core(msg),
            });
        }
    }

    fn dispatch(&mut self, env: Envelope) {
        match env.to {
            Node::Replica(r) => {
                if self.replicas[r as usize].is_none() {
                    return; // crashed: lost
                }
                let from = match env.from {
                    Node::Replica(f) => f,
                    Node::Agent(_) => ReplicaId::MAX, // ignored for an agent's 2a
                };
                match env.wire {
                    Wire::Core(msg) => self.with(r, |rep, now| rep.on_message(now, from, msg)),
                    Wire::Applied { txn, participant } => {
                        self.with(r, |rep, now| rep.on_applied(now, txn, &participant))
                    }
                }
            }
            Node::Agent(id) => {
                let Wire::Core(msg) = env.wire else {
                    panic!("agents only receive core messages")
                };
                match msg {
                    Msg::Prepare { txn, participants } => {
                        let agent = self.agents.get_mut(&id).expect("agent");
                        agent.participants = participants;
                        if agent.voted.is_none() {
                            if let Policy::Vote(v) = agent.policy {
                                self.vote(&id, txn, v, None);
                            }
                        }
                    }
                    Msg::Decide { txn, outcome } => {
                        let agent = self.agents.get_mut(&id).expect("agent");
                        if outcome == Outcome::Committed {
                            assert_eq!(
                                agent.voted,
                                Some(Vote::Prepared),
                                "{id} told to commit without having prepared"
                            );
                        }
                        agent.outcomes.push(outcome);
                        *self.counts.sent.entry("Applied (agent reply)").or_default() += 1;
                        self.queue.push_back(Envelope {
                            from: Node::Agent(id.clone()),
                            to: env.from,
                            wire: Wire::Applied {
                                txn,
                                participant: id,
                            },
                        });
                    }
                    other => panic!("agent {id} got {other:?}"),
                }
            }
        }
    }

    /// Delivers (FIFO) every queued message matching `pred`, including ones it produces.
    fn deliver_where(&mut self, pred: impl Fn(&Envelope) -> bool) {
        for _ in 0..10_000 {
            let Some(i) = self.queue.iter().position(&pred) else {
                return;
            };
            let env = self.queue.remove(i).expect("index");
            self.dispatch(env);
        }
        panic!("no quiescence");
    }

    fn deliver_all(&mut self) {
        self.deliver_where(|_| true);
    }

    fn drop_where(&mut self, pred: impl Fn(&Envelope) -> bool) -> usize {
        let before = self.queue.len();
        self.queue.retain(|e| !pred(e));
        before - self.queue.len()
    }

    fn duplicate_where(&mut self, pred: impl Fn(&Envelope) -> bool) {
        let dups: Vec<Envelope> = self.queue.iter().filter(|e| pred(e)).cloned().collect();
        self.queue.extend(dups);
    }

    fn crash(&mut self, r: ReplicaId) {
        self.replicas[r as usize] = None;
    }

    /// Rebuilds replica `r` from its `Persist` records (and its lazy hints if `keep_lazy`).
    fn recover(&mut self, r: ReplicaId, keep_lazy: bool) {
        let mut records = self.durable[r as usize].clone();
        if keep_lazy {
            records.extend(self.lazy[r as usize].iter().cloned());
        } else {
            self.lazy[r as usize].clear();
        }
        let replica = Replica::recover(self.cfgs[r as usize].clone(), 99, &records, self.now);
        self.replicas[r as usize] = Some(replica);
    }

    /// Moves time forward and fires the timers that are due on every live replica.
    fn advance(&mut self, ms: u64) {
        self.now += ms;
        for r in 0..self.n {
            if self.replicas[r as usize].is_some() {
                self.with(r, |rep, now| rep.on_tick(now));
            }
        }
    }

    /// Delivers everything and advances time in small steps until `done` holds.
    fn run_until(&mut self, step_ms: u64, max_ms: u64, done: impl Fn(&Sim) -> bool) {
        let start = self.now;
        while !done(self) {
            assert!(self.now - start <= max_ms, "no progress after {max_ms} ms");
            self.deliver_all();
            if done(self) {
                return;
            }
            self.advance(step_ms);
        }
    }

    fn decisions(&self) -> Vec<(ReplicaId, Outcome)> {
        self.events
            .iter()
            .filter_map(|(r, o)| match o {
                Output::Decided { outcome, .. } => Some((*r, *outcome)),
                _ => None,
            })
            .collect()
    }

    fn status(&self, r: ReplicaId, txn: TxnId) -> LocalStatus {
        self.replica(r).status(txn)
    }

    /// Starts a transaction on replica 0 with every agent enlisted, and commits it.
    fn begin_and_commit(&mut self) -> TxnId {
        let ids: Vec<String> = self.agents.keys().cloned().collect();
        let txn = self.with(0, |rep, now| rep.begin(now, 0x42));
        for id in &ids {
            let p = self.participant(id);
            self.with(0, |rep, now| rep.enlist(now, txn, p))
                .expect("enlist");
        }
        let answer = self
            .with(0, |rep, now| rep.commit(now, txn))
            .expect("commit");
        assert_eq!(answer, None, "not decided before any vote");
        txn
    }
}

fn to_agent(id: &'static str) -> impl Fn(&Envelope) -> bool {
    move |e| e.to == Node::Agent(id.to_string())
}

fn is_vote_of(id: &'static str) -> impl Fn(&Envelope) -> bool {
    move |e| matches!(&e.wire, Wire::Core(Msg::Phase2a { participant, ballot: 0, .. }) if participant == id)
}

fn to_replica(r: ReplicaId) -> impl Fn(&Envelope) -> bool {
    move |e| e.to == Node::Replica(r)
}

fn unanimous(sim: &Sim) -> Option<Outcome> {
    let ds = sim.decisions();
    let first = ds.first()?.1;
    assert!(
        ds.iter().all(|(_, o)| *o == first),
        "replicas decided differently: {ds:?}"
    );
    Some(first)
}

fn all_agents_got(sim: &Sim, outcome: Outcome) -> bool {
    sim.agents
        .values()
        .all(|a| !a.outcomes.is_empty() && a.outcomes.iter().all(|o| *o == outcome))
}

// ---------------------------------------------------------------------------- exact outputs

fn rs() -> (Participant, Participant) {
    (
        Participant::new("a", "a:5432"),
        Participant::new("b", "b:5432"),
    )
}

/// The fault-free commit with exact outputs at every step, for F = 0 and F = 1.
#[test]
fn fault_free_commit_exact_outputs() {
    for replicas in [1u32, 3] {
        let (a, b) = rs();
        let r = vec![a.clone(), b.clone()];
        let mut leader = Replica::new(Config::new(0, replicas), 1);
        let mut others: Vec<Replica> = (1..replicas)
            .map(|id| Replica::new(Config::new(id, replicas), 1 + u64::from(id)))
            .collect();

        let txn = leader.begin(0, 0x42);
        assert_eq!(txn.leader(), 0);
        leader.enlist(1, txn, a.clone()).unwrap();
        leader.enlist(2, txn, b.clone()).unwrap();
        leader.enlist(2, txn, b.clone()).unwrap(); // idempotent
        assert!(leader.drain().is_empty(), "begin and enlist write nothing");

        assert_eq!(leader.commit(10, txn), Ok(None));
        assert_eq!(
            leader.drain(),
            vec![
                Output::Send {
                    to: Dest::Agent(a.clone()),
                    msg: Msg::Prepare {
                        txn,
                        participants: r.clone()
                    }
                },
                Output::Send {
                    to: Dest::Agent(b.clone()),
                    msg: Msg::Prepare {
                        txn,
                        participants: r.clone()
                    }
                },
            ]
        );
        assert_eq!(
            leader.enlist(11, txn, Participant::new("c", "c:1")),
            Err(paxos_commit_core::TxnError::Frozen { txn })
        );

        // Each agent votes Prepared in ballot 0 to every acceptor.
        let accept = |p: &str| Record::Accept {
            txn,
            participant: p.to_string(),
            ballot: 0,
            vote: Vote::Prepared,
            participants: r.clone(),
        };
        let p2b = |p: &str| Msg::Phase2b {
            txn,
            participant: p.to_string(),
            ballot: 0,
            vote: Vote::Prepared,
        };
        let mut to_leader = Vec::new();
        for p in ["a", "b"] {
            for (to, msg) in participant::vote(txn, p, Vote::Prepared, &r, replicas) {
                if to == 0 {
                    continue; // delivered to the leader below
                }
                let other = &mut others[to as usize - 1];
                other.on_message(20, ReplicaId::MAX, msg);
                // The acceptance is durable before its 2b leaves, and the 2b goes to the leader.
                assert_eq!(
                    other.drain(),
                    vec![
                        Output::Persist(accept(p)),
                        Output::Send {
                            to: Dest::Replica(0),
                            msg: p2b(p)
                        }
                    ]
                );
                to_leader.push((to, p2b(p)));
            }
        }

        // The leader accepts a's vote itself (its own 2b is loopback).
        let votes_a = participant::vote(txn, "a", Vote::Prepared, &r, replicas);
        leader.on_message(30, ReplicaId::MAX, votes_a[0].1.clone());
        assert_eq!(leader.drain(), vec![Output::Persist(accept("a"))]);
        let decided = |outcome| Msg::Decided {
            txn,
            outcome,
            participants: r.clone(),
        };
        let decide_outputs = |leader_accepts_b: bool| {
            let mut v = Vec::new();
            if leader_accepts_b {
                v.push(Output::Persist(accept("b")));
            }
            v.push(Output::Decided {
                txn,
                outcome: Outcome::Committed,
                cause: None,
            });
            for to in 1..replicas {
                v.push(Output::Send {
                    to: Dest::Replica(to),
                    msg: decided(Outcome::Committed),
                });
            }
            for p in [&a, &b] {
                v.push(Output::Send {
                    to: Dest::Agent(p.clone()),
                    msg: Msg::Decide {
                        txn,
                        outcome: Outcome::Committed,
                    },
                });
            }
            // The leader's own acceptor learns the decision: a hint, not needed for safety.
            v.push(Output::PersistLazy(Record::Decided {
                txn,
                outcome: Outcome::Committed,
                participants: r.clone(),
            }));
            v
        };
        if replicas == 1 {
            // F = 0: the leader's own acceptance of b's vote completes the decision.
            leader.on_message(31, ReplicaId::MAX, votes_a[0].1.clone());
            assert!(leader.drain().is_empty(), "a duplicate vote writes nothing");
            let votes_b = participant::vote(txn, "b", Vote::Prepared, &r, 1);
            leader.on_message(32, ReplicaId::MAX, votes_b[0].1.clone());
            assert_eq!(leader.drain(), decide_outputs(true));
        } else {
            // F = 1: replica 1's 2b for a makes a chosen (2 of 3); b needs a majority too.
            let (from, msg) = to_leader[0].clone();
            leader.on_message(33, from, msg);
            assert!(leader.drain().is_empty());
            // b's 2b from replicas 1 and 2: the second one completes the majority.
            let (from, msg) = to_leader
                .iter()
                .find(|(f, m)| *f == 1 && *m == p2b("b"))
                .cloned()
                .unwrap();
            leader.on_message(34, from, msg);
            assert!(leader.drain().is_empty());
            let (from, msg) = to_leader
                .iter()
                .find(|(f, m)| *f == 2 && *m == p2b("b"))
                .cloned()
                .unwrap();
            leader.on_message(35, from, msg.clone());
            assert_eq!(leader.drain(), decide_outputs(false));
            // A late duplicate 2b changes nothing.
            leader.on_message(36, from, msg);
            assert!(leader.drain().is_empty());
            // The other replicas learn the decision (a hint) and keep watching.
            for other in &mut others {
                other.on_message(40, 0, decided(Outcome::Committed));
                assert_eq!(
                    other.drain(),
                    vec![Output::PersistLazy(Record::Decided {
                        txn,
                        outcome: Outcome::Committed,
                        participants: r.clone(),
                    })]
                );
                assert_eq!(other.status(txn).decided, Some(Outcome::Committed));
            }
        }
        assert_eq!(leader.status(txn).decided, Some(Outcome::Committed));

        // Both agents apply the decision; the last confirmation finishes the transaction.
        leader.on_applied(50, txn, "a");
        assert!(leader.drain().is_empty());
        leader.on_applied(51, txn, "a");
        assert!(leader.drain().is_empty());
        leader.on_applied(52, txn, "b");
        let mut expect = vec![Output::Finished {
            txn,
            outcome: Outcome::Committed,
        }];
        for to in 1..replicas {
            expect.push(Output::Send {
                to: Dest::Replica(to),
                msg: Msg::Finished {
                    txn,
                    outcome: Outcome::Committed,
                },
            });
        }
        expect.push(Output::PersistLazy(Record::Finished {
            txn,
            outcome: Outcome::Committed,
        }));
        assert_eq!(leader.drain(), expect);
        assert!(leader.status(txn).finished);
        for other in &mut others {
            other.on_message(
                60,
                0,
                Msg::Finished {
                    txn,
                    outcome: Outcome::Committed,
                },
            );
            assert_eq!(
                other.drain(),
                vec![Output::PersistLazy(Record::Finished {
                    txn,
                    outcome: Outcome::Committed
                })]
            );
        }

        // After the retention window every replica forgets it and says so.
        let retention = Config::new(0, replicas).retention_ms;
        leader.on_tick(52 + retention);
        assert!(leader.drain().is_empty());
        let st = leader.status(txn);
        assert!(!st.known && st.expired);
        // A late duplicate about it is ignored rather than restarting the protocol.
        leader.on_message(60 + retention, ReplicaId::MAX, votes_a[0].1.clone());
        assert!(leader.drain().is_empty());
        assert!(!leader.status(txn).known);
    }
}

/// The same commit over the simulated network, F = 0 and F = 1.
#[test]
fn fault_free_commit_over_the_network() {
    for replicas in [1u32, 3] {
        let mut sim = Sim::new(
            replicas,
            &[
                ("a", Policy::Vote(Vote::Prepared)),
                ("b", Policy::Vote(Vote::Prepared)),
            ],
        );
        let txn = sim.begin_and_commit();
        sim.deliver_all();
        assert_eq!(unanimous(&sim), Some(Outcome::Committed));
        assert_eq!(sim.decisions().len(), 1, "only the leader decides");
        assert!(all_agents_got(&sim, Outcome::Committed));
        assert!(sim
            .events
            .iter()
            .any(|(r, o)| *r == 0 && matches!(o, Output::Finished { .. })));
        for r in 0..replicas {
            let st = sim.status(r, txn);
            assert_eq!(st.decided, Some(Outcome::Committed));
            assert!(st.finished, "replica {r} learned that it finished");
        }
    }
}

#[test]
fn one_aborted_vote_aborts() {
    for replicas in [1u32, 3] {
        let mut sim = Sim::new(
            replicas,
            &[
                ("a", Policy::Vote(Vote::Prepared)),
                ("b", Policy::Vote(Vote::Aborted)),
            ],
        );
        let txn = sim.begin_and_commit();
        // Deliver b's Prepare first: its Aborted vote alone decides, before a even votes.
        sim.deliver_where(to_agent("b"));
        sim.deliver_where(is_vote_of("b"));
        sim.deliver_where(|e| matches!(e.wire, Wire::Core(Msg::Phase2b { .. })));
        assert_eq!(unanimous(&sim), Some(Outcome::Aborted));
        assert!(sim.events.iter().any(|(_, o)| matches!(
            o,
            Output::Decided { cause: Some(paxos_commit_core::AbortCause::Voted(p)), .. } if p == "b"
        )));
        sim.deliver_all();
        assert!(all_agents_got(&sim, Outcome::Aborted));
        assert_eq!(sim.status(0, txn).decided, Some(Outcome::Aborted));
        assert!(sim.status(0, txn).finished);
    }
}

// ---------------------------------------------------------------------------- takeover

/// Sets up F = 1, both agents prepared; delivers the votes of each agent only to the listed
/// acceptors; drops every 2b so that the leader learns nothing; then crashes the leader.
fn leader_dies_after_votes(reach: &[(&'static str, &[ReplicaId])]) -> (Sim, TxnId) {
    let mut sim = Sim::new(3, &[("a", Policy::Silent), ("b", Policy::Silent)]);
    let txn = sim.begin_and_commit();
    sim.deliver_where(|e| matches!(e.to, Node::Agent(_)));
    for (id, to) in reach {
        sim.vote(id, txn, Vote::Prepared, Some(to));
    }
    sim.deliver_where(|e| matches!(e.wire, Wire::Core(Msg::Phase2a { .. })));
    sim.drop_where(|e| matches!(e.wire, Wire::Core(Msg::Phase2b { .. })));
    sim.crash(0);
    (sim, txn)
}

#[test]
fn takeover_commits_when_every_vote_reached_a_majority() {
    // Votes reach the leader and replica 1; the leader dies before it counts them.
    let mut sim = Sim::new(3, &[("a", Policy::Silent), ("b", Policy::Silent)]);
    let txn = sim.begin_and_commit();
    sim.deliver_where(|e| matches!(e.to, Node::Agent(_)));
    sim.vote("a", txn, Vote::Prepared, Some(&[0, 1]));
    sim.vote("b", txn, Vote::Prepared, Some(&[0, 1]));
    sim.deliver_where(is_vote_of("a"));
    sim.deliver_where(is_vote_of("b"));
    assert_eq!(
        sim.drop_where(to_replica(0)),
        2,
        "replica 1's 2b to the leader lost"
    );
    sim.crash(0);
    assert!(sim.decisions().is_empty());

    // Nothing happens before the takeover timeout; after it, replica 1 runs phase 1.
    sim.advance(1_000);
    assert!(sim.queue.is_empty());
    let takeover = Config::new(1, 3).takeover_after_ms;
    sim.advance(2 * takeover);
    let ballots: Vec<u64> = sim
        .queue
        .iter()
        .filter_map(|e| match &e.wire {
            Wire::Core(Msg::Phase1a { ballot, .. }) => Some(*ballot),
            _ => None,
        })
        .collect();
    assert!(!ballots.is_empty(), "a replica started phase 1");
    assert!(ballots.iter().all(|b| *b > 0));
    // Replica 1 (promised by itself and 2) re-proposes Prepared for both: Committed.
    sim.run_until(100, 20_000, |s| {
        unanimous(s).is_some() && all_agents_got(s, Outcome::Committed)
    });
    assert_eq!(unanimous(&sim), Some(Outcome::Committed));
    assert!(sim.durable[1]
        .iter()
        .any(|r| matches!(r, Record::Round { round } if *round >= 1)));

    // The old leader comes back with its acceptances and learns the same outcome.
    sim.recover(0, false);
    sim.run_until(100, 20_000, |s| s.status(0, txn).decided.is_some());
    assert_eq!(sim.status(0, txn).decided, Some(Outcome::Committed));
    assert_eq!(unanimous(&sim), Some(Outcome::Committed));
}

#[test]
fn takeover_aborts_when_a_vote_reached_no_one_alive() {
    // a's vote reached only the leader, which died; b's reached a majority.
    let (mut sim, txn) = leader_dies_after_votes(&[("a", &[0]), ("b", &[1, 2])]);
    assert!(sim.decisions().is_empty());
    sim.run_until(100, 20_000, |s| {
        unanimous(s).is_some() && all_agents_got(s, Outcome::Aborted)
    });
    assert_eq!(unanimous(&sim), Some(Outcome::Aborted));
    // The instance of a is chosen Aborted in a ballot > 0 on a majority.
    let accepted_a: Vec<(u64, Vote)> = [1, 2]
        .iter()
        .filter_map(|r| sim.status(*r, txn).accepted.get("a").copied())
        .collect();
    assert!(accepted_a
        .iter()
        .all(|(b, v)| *b > 0 && *v == Vote::Aborted));
    // b's late ballot-0 vote can no longer be accepted by those who promised higher.
    sim.vote("b", txn, Vote::Prepared, Some(&[1]));
    sim.deliver_all();
    let (ballot_b, vote_b) = sim.status(1, txn).accepted["b"];
    assert!(
        ballot_b > 0 && vote_b == Vote::Prepared,
        "re-proposed in the takeover ballot"
    );
    // The old leader returns with a's Prepared in ballot 0, which was never chosen.
    sim.recover(0, false);
    assert_eq!(sim.status(0, txn).accepted["a"], (0, Vote::Prepared));
    sim.run_until(100, 20_000, |s| s.status(0, txn).decided.is_some());
    assert_eq!(sim.status(0, txn).decided, Some(Outcome::Aborted));
    assert_eq!(unanimous(&sim), Some(Outcome::Aborted));
}

#[test]
fn in_doubt_participant_supplies_r_to_a_replica_that_knows_nothing() {
    // Both votes reached the leader and replica 1 only; the leader died. Replica 2 has never
    // heard of the transaction; the in-doubt agent a asks it, giving R.
    let (mut sim, txn) = leader_dies_after_votes(&[("a", &[0, 1]), ("b", &[0, 1])]);
    assert!(!sim.status(2, txn).known);
    let r: Vec<Participant> = vec![sim.participant("a"), sim.participant("b")];
    // Without R or a participant, replica 2 cannot help.
    let err = sim.with(2, |rep, now| rep.resolve(now, txn, None, &[]));
    assert!(matches!(
        err,
        Err(paxos_commit_core::TxnError::Unknown { .. })
    ));
    let answer = sim.with(2, |rep, now| rep.resolve(now, txn, Some("a"), &r));
    assert_eq!(answer, Ok(None), "not known yet: phase 1 started");
    // The caller's R only names what to ask about: R comes from the acceptors' phase 1b.
    assert!(sim.status(2, txn).participants.is_empty());
    let ballot = sim
        .queue
        .iter()
        .find_map(|e| match &e.wire {
            Wire::Core(Msg::Phase1a {
                ballot,
                participants,
                ..
            }) => {
                assert!(participants.is_empty());
                Some(*ballot)
            }
            _ => None,
        })
        .expect("phase 1a sent");
    assert_eq!(ballot % 3, 2, "replica 2's ballot");
    // Replica 1 reports both ballot-0 Prepared acceptances: replica 2 re-proposes them.
    sim.deliver_all();
    assert_eq!(unanimous(&sim), Some(Outcome::Committed));
    assert!(sim.decisions().iter().all(|(r, _)| *r == 2));
    assert!(all_agents_got(&sim, Outcome::Committed));
    // Asking again answers from what the replica knows.
    let again = sim.with(2, |rep, now| rep.resolve(now, txn, Some("a"), &r));
    assert_eq!(again, Ok(Some(Outcome::Committed)));
}

#[test]
fn in_doubt_participant_whose_vote_reached_no_one_alive_gets_abort() {
    let (mut sim, txn) = leader_dies_after_votes(&[("a", &[0]), ("b", &[0])]);
    let r: Vec<Participant> = vec![sim.participant("a"), sim.participant("b")];
    let answer = sim.with(2, |rep, now| rep.resolve(now, txn, Some("b"), &r));
    assert_eq!(answer, Ok(None));
    sim.deliver_all();
    assert_eq!(unanimous(&sim), Some(Outcome::Aborted));
    // No acceptor alive knows R, so nobody is told: each in-doubt participant learns the
    // outcome by asking, as b just did.
    for p in ["a", "b"] {
        let answer = sim.with(2, |rep, now| rep.resolve(now, txn, Some(p), &[]));
        assert_eq!(answer, Ok(Some(Outcome::Aborted)), "{p}");
    }
    // When the old leader recovers with both Prepared votes accepted in ballot 0, it still
    // ends Aborted: one acceptor out of three never made them chosen.
    sim.recover(0, false);
    sim.run_until(100, 20_000, |s| s.status(0, txn).decided.is_some());
    assert_eq!(sim.status(0, txn).decided, Some(Outcome::Aborted));
}

/// A caller of Resolve (an operator, or an agent) that names a shorter R than the leader
/// froze must not make a takeover commit that subset. The attack: a voted Prepared, b voted
/// Aborted, both votes reached acceptors 0 and 2, and leader 0 decided Aborted; replica 1,
/// which never heard of the transaction, is asked to resolve it with R = [a].
#[test]
fn a_short_r_from_a_caller_cannot_split_a_decided_transaction() {
    let mut sim = Sim::new(3, &[("a", Policy::Silent), ("b", Policy::Silent)]);
    let txn = sim.begin_and_commit();
    let r: Vec<Participant> = vec![sim.participant("a"), sim.participant("b")];
    for id in ["a", "b"] {
        sim.agents.get_mut(id).expect("agent").participants = r.clone();
    }
    sim.drop_where(|e| matches!(e.to, Node::Agent(_)));
    sim.vote("a", txn, Vote::Prepared, Some(&[0, 2]));
    sim.vote("b", txn, Vote::Aborted, Some(&[0, 2]));
    // Replica 1 hears nothing of it (restarting, or its links held up).
    sim.deliver_where(|e| e.to != Node::Replica(1));
    sim.drop_where(|e| e.to == Node::Replica(1));
    assert_eq!(sim.status(0, txn).decided, Some(Outcome::Aborted));
    assert!(!sim.status(1, txn).known);
    let short = vec![sim.participant("a")];
    let _ = sim.with(1, |rep, now| rep.resolve(now, txn, None, &short));
    sim.deliver_all();
    sim.run_until(100, 20_000, |s| s.status(1, txn).decided.is_some());
    assert_eq!(sim.status(1, txn).decided, Some(Outcome::Aborted));
    assert_eq!(unanimous(&sim), Some(Outcome::Aborted));
    assert!(sim.agents["a"]
        .outcomes
        .iter()
        .all(|o| *o == Outcome::Aborted));
}

/// A participant that restarted after PREPARE no longer knows R. A Prepared vote without R
/// must not be accepted: once chosen it could neither commit (R unknown) nor abort. Asking
/// with its instance named instead lets a takeover choose Aborted for it.
#[test]
fn prepared_vote_without_r_is_refused_and_asking_aborts() {
    let mut sim = Sim::new(3, &[("a", Policy::Silent)]);
    let txn = sim.begin_and_commit();
    sim.drop_where(|e| matches!(e.to, Node::Agent(_)));
    sim.crash(0);
    // The restarted agent's R-less vote reaches every acceptor still up: none takes it.
    sim.vote("a", txn, Vote::Prepared, Some(&[1, 2]));
    sim.deliver_all();
    for r in [1, 2] {
        assert!(
            sim.status(r, txn).accepted.is_empty(),
            "replica {r} accepted it"
        );
    }
    let answer = sim.with(1, |rep, now| rep.resolve(now, txn, Some("a"), &[]));
    assert_eq!(answer, Ok(None));
    sim.deliver_all();
    assert_eq!(sim.status(1, txn).decided, Some(Outcome::Aborted));
    assert_eq!(unanimous(&sim), Some(Outcome::Aborted));
}

/// F = 0 (classic 2PC on the same code path): an in-doubt participant asks the restarted
/// single replica. Its phase 1 goes only to itself (loopback), so the answer must come within
/// the same call, not after the next unrelated input.
#[test]
fn single_replica_resolves_within_the_call() {
    let mut sim = Sim::new(1, &[("a", Policy::Silent), ("b", Policy::Silent)]);
    let txn = sim.begin_and_commit();
    sim.deliver_where(|e| matches!(e.to, Node::Agent(_)));
    sim.vote("a", txn, Vote::Prepared, None);
    sim.deliver_all();
    assert!(sim.decisions().is_empty(), "b has not voted");
    sim.crash(0);
    sim.recover(0, false);
    let r: Vec<Participant> = vec![sim.participant("a"), sim.participant("b")];
    let answer = sim.with(0, |rep, now| rep.resolve(now, txn, Some("a"), &r));
    assert_eq!(answer, Ok(Some(Outcome::Aborted)));
    assert_eq!(unanimous(&sim), Some(Outcome::Aborted));
    // The Decide messages are already on their way.
    sim.deliver_all();
    assert!(all_agents_got(&sim, Outcome::Aborted));

    // A client's Commit of a transaction that touched no database: the single replica's
    // acceptor learns the decision in the same call too.
    let empty = sim.with(0, |rep, now| rep.begin(now, 0x43));
    assert_eq!(
        sim.with(0, |rep, now| rep.commit(now, empty)),
        Ok(Some(Outcome::Committed))
    );
    assert!(sim.lazy[0]
        .iter()
        .any(|r| matches!(r, Record::Decided { txn, .. } if *txn == empty)));
}

#[test]
fn duelling_takeovers_converge_to_one_decision() {
    // a's vote reached replicas 1 and 2 (chosen Prepared in ballot 0); b's reached no one.
    let (mut sim, txn) = leader_dies_after_votes(&[("a", &[1, 2])]);
    let is_1a = |e: &Envelope| matches!(e.wire, Wire::Core(Msg::Phase1a { .. }));
    // Three rounds in which both survivors take over at once and their 1a's cross: replica 2
    // promised its own (higher) ballot before replica 1's 1a arrives (Nack), and replica 1
    // promises replica 2's ballot, whose 1b is then held back until the next round made it
    // stale.
    for round in 1..=3u64 {
        sim.with(1, |rep, now| rep.on_timer(now, txn));
        sim.with(2, |rep, now| rep.on_timer(now, txn));
        assert_eq!(sim.status(1, txn).promised, round * 3 + 1);
        assert_eq!(sim.status(2, txn).promised, round * 3 + 2);
        sim.deliver_where(|e| e.to == Node::Replica(2) && is_1a(e));
        sim.deliver_where(|e| e.to == Node::Replica(1) && is_1a(e));
        sim.deliver_where(|e| matches!(e.wire, Wire::Core(Msg::Nack { .. })));
        assert_eq!(sim.counts.sent.get("Nack").copied(), Some(round as usize));
        assert!(sim.decisions().is_empty());
    }
    // Then the network and the (randomised) back-off timers run freely.
    sim.run_until(50, 60_000, |s| {
        s.status(1, txn).decided.is_some()
            && s.status(2, txn).decided.is_some()
            && all_agents_got(s, Outcome::Aborted)
    });
    assert_eq!(unanimous(&sim), Some(Outcome::Aborted), "b never voted");
    // The instance a was chosen Prepared in ballot 0; no takeover changed it.
    for r in [1, 2] {
        let st = sim.status(r, txn);
        assert_eq!(st.decided, Some(Outcome::Aborted));
        assert_eq!(st.accepted["a"].1, Vote::Prepared);
        assert_eq!(st.accepted["b"].1, Vote::Aborted);
    }
}

// ---------------------------------------------------------------------------- crash after decision

#[test]
fn recovered_replica_pushes_the_decision_again() {
    for keep_lazy in [true, false] {
        let mut sim = Sim::new(
            3,
            &[
                ("a", Policy::Vote(Vote::Prepared)),
                ("b", Policy::Vote(Vote::Prepared)),
            ],
        );
        let txn = sim.begin_and_commit();
        // Everything up to the decision, but the Decide messages to the agents are lost and
        // so are the Decided messages to the other replicas.
        sim.deliver_where(|e| {
            !matches!(e.wire, Wire::Core(Msg::Decide { .. } | Msg::Decided { .. }))
        });
        assert_eq!(unanimous(&sim), Some(Outcome::Committed));
        assert_eq!(sim.drop_where(|_| true), 4);
        assert!(sim.agents.values().all(|a| a.outcomes.is_empty()));
        sim.crash(0);
        sim.recover(0, keep_lazy);
        let st = sim.status(0, txn);
        assert_eq!(
            st.decided,
            keep_lazy.then_some(Outcome::Committed),
            "the Decided hint is all that says so"
        );
        assert_eq!(st.accepted.len(), 2);
        // The recovered replica's timer fires and the decision reaches the agents again
        // (directly from the hint, or through a phase 1 that re-learns it).
        sim.run_until(100, 20_000, |s| all_agents_got(s, Outcome::Committed));
        assert_eq!(unanimous(&sim), Some(Outcome::Committed));
        if keep_lazy {
            assert!(
                !sim.durable[0]
                    .iter()
                    .any(|r| matches!(r, Record::Round { .. })),
                "no phase 1 needed when the hint survived"
            );
        }
        sim.run_until(100, 20_000, |s| s.status(0, txn).finished);
    }
}

#[test]
fn duplicates_are_harmless() {
    let mut sim = Sim::new(
        3,
        &[
            ("a", Policy::Vote(Vote::Prepared)),
            ("b", Policy::Vote(Vote::Prepared)),
        ],
    );
    let txn = sim.begin_and_commit();
    sim.duplicate_where(|_| true);
    sim.deliver_where(|e| matches!(e.to, Node::Agent(_)));
    sim.duplicate_where(|_| true);
    sim.deliver_all();
    assert_eq!(unanimous(&sim), Some(Outcome::Committed));
    assert_eq!(sim.decisions().len(), 1);
    // Each acceptor wrote each acceptance once although it saw it twice.
    assert_eq!(sim.counts.persist, vec![2, 2, 2]);
    assert!(sim.status(0, txn).finished);
}

// ---------------------------------------------------------------------------- counting

struct Tally {
    sent: BTreeMap<&'static str, usize>,
    persist: Vec<usize>,
    batches: Vec<usize>,
    lazy: Vec<usize>,
}

fn fault_free(f: u32, n: usize) -> Tally {
    let replicas = 2 * f + 1;
    let names: Vec<String> = (0..n).map(|i| format!("p{i}")).collect();
    let agents: Vec<(&str, Policy)> = names
        .iter()
        .map(|s| (s.as_str(), Policy::Vote(Vote::Prepared)))
        .collect();
    let mut sim = Sim::new(replicas, &agents);
    let txn = sim.begin_and_commit();
    sim.deliver_all();
    assert_eq!(unanimous(&sim), Some(Outcome::Committed));
    for r in 0..replicas {
        assert!(sim.status(r, txn).finished);
    }
    Tally {
        sent: sim.counts.sent.clone(),
        persist: sim.counts.persist.clone(),
        batches: sim.counts.persist_batches.clone(),
        lazy: sim.counts.lazy.clone(),
    }
}

/// Messages and durable writes of one fault-free commit, by N participants and F.
///
/// Counted: network messages (`Output::Send`, plus the agents' 2a and their Applied replies).
/// A replica's messages to itself are loopback and not counted as sent; they are listed in the
/// `loopback` column as derived: the leader's own 2b per participant, its own Decided and its
/// own Finished.
#[test]
fn message_and_write_counts() {
    println!();
    println!(
        "| N | F | replicas | Prepare | 2a (votes) | 2b | Decided | Decide | Applied | Finished | network total | loopback | Persist/acceptor | Persist total | fsync batches/acceptor | PersistLazy/replica |"
    );
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for n in [2usize, 5] {
        for f in [0u32, 1, 2] {
            let t = fault_free(f, n);
            let r = (2 * f + 1) as usize;
            let get = |k: &str| t.sent.get(k).copied().unwrap_or(0);
            let prepare = get("Prepare (agent)");
            let votes = get("2a (ballot 0, vote)");
            let p2b = get("2b (ballot 0)");
            let decided = get("Decided (replica)");
            let decide = get("Decide (agent)");
            let applied = get("Applied (agent reply)");
            let finished = get("Finished (replica)");
            let total: usize = t.sent.values().sum();
            let loopback = n + 2;

            // What the protocol says, with R = 2F + 1 acceptors and the leader one of them:
            assert_eq!(prepare, n, "one Prepare per participant");
            assert_eq!(votes, n * r, "each participant's vote to every acceptor");
            assert_eq!(
                p2b,
                n * (r - 1),
                "every acceptor's 2b to the leader, minus its own"
            );
            assert_eq!(decided, r - 1, "the decision to the other replicas");
            assert_eq!(decide, n, "the decision to each participant");
            assert_eq!(applied, n);
            assert_eq!(finished, r - 1);
            assert_eq!(total, n * (2 * r + 2) + 2 * (r - 1), "nothing else");
            assert_eq!(
                t.sent
                    .keys()
                    .filter(|k| k.contains("1a")
                        || k.contains("1b")
                        || k.contains("Nack")
                        || k.contains("> 0"))
                    .count(),
                0,
                "no phase 1, no ballot above 0"
            );
            assert!(
                t.persist.iter().all(|p| *p == n),
                "one Accept per instance per acceptor"
            );
            assert!(
                t.batches.iter().all(|b| *b == n),
                "one write per 2a delivery"
            );
            assert!(t.lazy.iter().all(|l| *l == 2), "Decided and Finished hints");

            println!(
                "| {n} | {f} | {r} | {prepare} | {votes} | {p2b} | {decided} | {decide} | {applied} | {finished} | {total} | {loopback} | {} | {} | {} | {} |",
                t.persist[0],
                t.persist.iter().sum::<usize>(),
                t.batches[0],
                t.lazy[0],
            );
        }
    }
}

/// A replica brought back with `--rejoin` (its log lost) stays silent on every transaction
/// that may be older than the rejoin, and refuses to take one over, but is a full acceptor
/// and leader for the transactions it begins itself afterwards, across its own restarts.
#[test]
fn a_rejoined_replica_answers_only_for_transactions_it_began_after() {
    let (a, b) = rs();
    let r_set = vec![a.clone(), b.clone()];
    let mut r = Replica::recover(Config::new(1, 3), 7, &[Record::Rejoined], 0);
    assert!(r.stats().rejoined);
    assert_eq!(r.durable_records()[0], Record::Rejoined);

    // Led by replica 0 and begun before: its vote, a phase 1a and a phase 2a get silence.
    let old = TxnId::new(0, 42);
    let vote = |txn: TxnId, p: &Participant| Msg::Phase2a {
        txn,
        participant: p.id.clone(),
        ballot: 0,
        vote: Vote::Prepared,
        participants: r_set.clone(),
    };
    r.on_message(0, 0, vote(old, &a));
    r.on_message(
        0,
        0,
        Msg::Phase1a {
            txn: old,
            ballot: 3,
            participants: r_set.clone(),
        },
    );
    r.on_message(
        0,
        0,
        Msg::Phase2a {
            txn: old,
            participant: a.id.clone(),
            ballot: 3,
            vote: Vote::Aborted,
            participants: r_set.clone(),
        },
    );
    assert_eq!(r.drain(), vec![]);
    assert!(!r.answers_for(old));
    // Nor does it take one over, whoever asks; not even one it led itself before.
    assert!(matches!(
        r.resolve(0, old, Some("a"), &r_set),
        Err(paxos_commit_core::TxnError::Abstains { .. })
    ));
    let old_own = TxnId::new(1, 43);
    r.on_message(0, 0, vote(old_own, &a));
    assert_eq!(r.drain(), vec![]);
    assert!(matches!(
        r.resolve(0, old_own, None, &[]),
        Err(paxos_commit_core::TxnError::Abstains { .. })
    ));
    // Its timers never start a phase 1 for them either.
    r.on_tick(u64::MAX / 2);
    assert!(r.drain().iter().all(|o| !matches!(
        o,
        Output::Send {
            msg: Msg::Phase1a { .. },
            ..
        }
    )));

    // A transaction it begins now: its acceptor accepts the votes and persists them.
    let t = r.begin(0, 5);
    r.enlist(0, t, a.clone()).expect("enlist a");
    r.enlist(0, t, b.clone()).expect("enlist b");
    assert_eq!(r.commit(0, t), Ok(None));
    r.drain();
    r.on_message(0, 0, vote(t, &a));
    let out = r.drain();
    assert!(
        out.iter()
            .any(|o| matches!(o, Output::Persist(Record::Accept { txn, .. }) if *txn == t)),
        "{out:?}"
    );
    assert!(r.answers_for(t));

    // Restarted from its new log, it still answers for that one, and still not for the rest.
    let mut records = vec![Record::Rejoined];
    records.extend(out.into_iter().filter_map(|o| match o {
        Output::Persist(rec) => Some(rec),
        _ => None,
    }));
    let mut again = Replica::recover(Config::new(1, 3), 8, &records, 0);
    assert!(again.answers_for(t));
    assert!(!again.answers_for(old));
    again.on_message(0, 0, vote(t, &b));
    assert!(again
        .drain()
        .iter()
        .any(|o| matches!(o, Output::Persist(Record::Accept { txn, .. }) if *txn == t)));
}

/// A transaction that touched no database commits at once and is finished at once: nothing
/// is left for a Commit that waits for the participants to apply it.
#[test]
fn an_empty_transaction_commits_and_finishes_at_once() {
    let mut r = Replica::new(Config::new(0, 3), 1);
    let t = r.begin(0, 9);
    assert_eq!(r.commit(0, t), Ok(Some(Outcome::Committed)));
    let status = r.status(t);
    assert_eq!(status.decided, Some(Outcome::Committed));
    assert!(status.finished, "{status:?}");
    let out = r.drain();
    assert!(
        out.iter().any(
            |o| matches!(o, Output::Finished { txn, outcome: Outcome::Committed } if *txn == t)
        ),
        "{out:?}"
    );
}
