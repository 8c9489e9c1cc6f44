//! What a replica knows of a transaction it coordinates: as the leader a client began it on,
//! or as a replica that took it over. Volatile by design: the decision is implied by the
//! acceptors' durable state, so a restarted replica rebuilds it with a phase 1.

use crate::types::{majority, Ballot, Outcome, Participant, ReplicaId, Vote};
use std::collections::{BTreeMap, BTreeSet};

/// One acceptor's phase 1b: every (instance, ballot, value) it accepted.
pub type Promise = Vec<(String, Ballot, Vote)>;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Phase {
    /// Begun here; participants are enlisting; nothing is prepared yet.
    Open,
    /// The participant set is frozen and votes are being collected (or recovered).
    Voting,
    Decided(Outcome),
}

/// Why a transaction aborted, as the replica that decided it knows it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AbortCause {
    /// The client asked.
    Client,
    /// Still open (nothing asked to prepare) when its leader was asked to resolve it.
    Abandoned,
    /// Still open at its deadline.
    OpenTimeout,
    /// The participant's own (ballot 0) vote was Aborted: it could not prepare.
    Voted(String),
    /// A higher ballot (a takeover, or the leader's own recovery) chose Aborted for the
    /// participant: no Prepared vote of it was known to a majority of acceptors in time.
    NoVote(String),
}

impl std::fmt::Display for AbortCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            AbortCause::Client => write!(f, "aborted by the client"),
            AbortCause::Abandoned => write!(f, "abandoned before commit"),
            AbortCause::OpenTimeout => write!(f, "open past its deadline"),
            AbortCause::Voted(p) => write!(f, "participant {p} voted Aborted (it did not prepare)"),
            AbortCause::NoVote(p) => write!(
                f,
                "a takeover chose Aborted for participant {p}: no Prepared vote of it was \
                 known to a majority of acceptors in time (the participant or the leader was \
                 slow, paused or unreachable)"
            ),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Coordination {
    pub phase: Phase,
    /// The participant set R, by id. Frozen once `phase` leaves `Open`.
    pub participants: BTreeMap<String, Participant>,
    /// When R is unknown (recovery on behalf of one in-doubt participant), the instances
    /// this replica may still decide.
    pub instances_hint: BTreeSet<String>,
    /// The ballot this replica drives; 0 while it relies on the participants' own votes.
    pub ballot: Ballot,
    /// Phase 1b replies for `ballot`, while phase 1 runs.
    pub promises: Option<BTreeMap<ReplicaId, Promise>>,
    /// (instance, ballot) → value and the acceptors that accepted it.
    pub tally: BTreeMap<(String, Ballot), (Vote, BTreeSet<ReplicaId>)>,
    /// Instances whose value is chosen.
    pub chosen: BTreeMap<String, Vote>,
    /// Instances chosen Aborted in a takeover ballot rather than by the participant's own
    /// ballot-0 vote: the abort's reason must not blame the participant for a slow leader.
    pub aborted_by_takeover: BTreeSet<String>,
    /// Participants that confirmed they applied the decision.
    pub applied: BTreeSet<String>,
    /// Every participant applied the decision and the replicas were told.
    pub finished: bool,
    /// Aborted while still open: no acceptor ever heard of it, so none needs telling.
    pub local_only: bool,
    /// Why it aborted, when this replica decided so.
    pub cause: Option<AbortCause>,
    pub since: u64,
}

impl Coordination {
    pub fn new(phase: Phase, since: u64) -> Coordination {
        Coordination {
            phase,
            participants: BTreeMap::new(),
            instances_hint: BTreeSet::new(),
            ballot: 0,
            promises: None,
            tally: BTreeMap::new(),
            chosen: BTreeMap::new(),
            aborted_by_takeover: BTreeSet::new(),
            applied: BTreeSet::new(),
            finished: false,
            local_only: false,
            cause: None,
            since,
        }
    }

    /// The decision is known: the votes that led to it no longer matter.
    pub fn settle(&mut self, outcome: Outcome) {
        self.phase = Phase::Decided(outcome);
        self.promises = None;
        self.tally.clear();
        self.chosen.clear();
    }

    pub fn participant_list(&self) -> Vec<Participant> {
        self.participants.values().cloned().collect()
    }

    pub fn all_applied(&self) -> bool {
        self.participants.keys().all(|p| self.applied.contains(p))
    }

    pub fn learn_participants(&mut self, participants: &[Participant]) {
        if self.participants.is_empty() {
            self.participants = participants
                .iter()
                .map(|p| (p.id.clone(), p.clone()))
                .collect();
        }
    }

    /// Counts a phase 2b; returns true when it made the instance chosen.
    pub fn tally_2b(
        &mut self,
        acceptor: ReplicaId,
        instance: &str,
        ballot: Ballot,
        vote: Vote,
        replicas: u32,
    ) -> bool {
        if self.chosen.contains_key(instance) || !self.in_r(instance) {
            return false;
        }
        let entry = self
            .tally
            .entry((instance.to_string(), ballot))
            .or_insert_with(|| (vote, BTreeSet::new()));
        if entry.0 != vote {
            // One ballot carries one value; a different one would be a protocol bug upstream.
            return false;
        }
        entry.1.insert(acceptor);
        if entry.1.len() >= majority(replicas) {
            self.chosen.insert(instance.to_string(), vote);
            if vote == Vote::Aborted && ballot > 0 {
                self.aborted_by_takeover.insert(instance.to_string());
            }
            // Its other ballots' counts can no longer matter.
            self.tally.retain(|(i, _), _| i != instance);
            return true;
        }
        false
    }

    /// Whether `instance` is one of the transaction's instances, as far as this replica knows
    /// (any instance while R is unknown).
    fn in_r(&self, instance: &str) -> bool {
        self.participants.is_empty() || self.participants.contains_key(instance)
    }

    /// The decision rule of Paxos Commit: Abort as soon as any instance of R chose Aborted,
    /// Commit once every participant's instance chose Prepared.
    ///
    /// Only R's instances count: every replica that decides must reach the same answer, and
    /// another replica (a takeover) proposes and counts over R alone, so a value chosen for an
    /// instance outside R (which no honest participant sends, see the acceptor) must not
    /// abort here what commits there.
    pub fn decision(&self) -> Option<(Outcome, Option<AbortCause>)> {
        if let Some((p, _)) = self
            .chosen
            .iter()
            .find(|(p, v)| **v == Vote::Aborted && self.in_r(p))
        {
            let cause = if self.aborted_by_takeover.contains(p) {
                AbortCause::NoVote(p.clone())
            } else {
                AbortCause::Voted(p.clone())
            };
            return Some((Outcome::Aborted, Some(cause)));
        }
        let all_prepared = !self.participants.is_empty()
            && self
                .participants
                .keys()
                .all(|p| self.chosen.get(p) == Some(&Vote::Prepared));
        all_prepared.then_some((Outcome::Committed, None))
    }

    /// The instances phase 2 of a takeover proposes for.
    pub fn instances(&self) -> Vec<String> {
        if self.participants.is_empty() {
            self.instances_hint.iter().cloned().collect()
        } else {
            self.participants.keys().cloned().collect()
        }
    }
}
