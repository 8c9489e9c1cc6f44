//! Who this replica is, and whether it may act as one: a replica's acceptor log is its
//! promises, and a log that is missing cannot tell "this replica never ran" from "this
//! replica ran and its disk was lost". The second, started as new, is an acceptor with
//! amnesia: it could answer below a ballot it promised and let two outcomes be chosen.
//!
//! So every log is born with an *incarnation*, a random number that names this life of the
//! replica, and a replica starts unadmitted: it answers for nothing until every other replica
//! has recorded that incarnation durably (a *fence*) and said it knew no other. A replica of
//! the group that was ever admitted is fenced at every replica that was admitted with it or
//! after it, so a lost log comes back with a new incarnation and is refused by any peer that
//! still remembers; only the operator's `--rejoin` (which abstains from every older
//! transaction) replaces a fence. The same fences drop messages from any other incarnation:
//! a stale process, or an old one still running on a host cut off from the rest, is not
//! heard once its replacement joined.
//!
//! Pure state and rules; the shell asks the peers and carries the incarnations on the wire.

use crate::msg::Record;
use crate::types::ReplicaId;
use std::collections::{BTreeMap, BTreeSet};

/// How a replica asks to be admitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JoinMode {
    /// Its log was just created: it claims never to have run. Refused by a peer that knows
    /// another incarnation of it. (A log from before incarnations is given one and joins so
    /// too: its peers know no other.)
    First,
    /// The operator's `--rejoin`: it lost its log and answers only for new transactions, so
    /// the peers replace what they knew of it.
    Rejoin,
}

/// A peer's answer to a join.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum JoinAnswer {
    /// Recorded (or already known): the joiner may count this peer.
    Admitted,
    /// This peer knows the joiner under another incarnation: its log was lost.
    Known { incarnation: u64 },
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct Admission {
    /// This life's incarnation (`Record::Incarnation`); `None` on a log from before them.
    incarnation: Option<u64>,
    /// `Record::Admitted` was written (or the log predates incarnations).
    admitted: bool,
    /// Each peer's incarnation as recorded here (`Record::Fence`).
    fences: BTreeMap<ReplicaId, u64>,
    /// Peers that admitted this life since the process started (asked again after a restart).
    answered: BTreeSet<ReplicaId>,
}

impl Admission {
    /// A replica as the model and the unit tests start it: admitted, nothing fenced.
    pub fn admitted() -> Admission {
        Admission {
            admitted: true,
            ..Admission::default()
        }
    }

    /// Replays one record; false when the record is not about admission.
    pub fn replay(&mut self, record: &Record) -> bool {
        match record {
            Record::Incarnation { incarnation } => self.incarnation = Some(*incarnation),
            Record::Admitted => self.admitted = true,
            Record::Fence {
                replica,
                incarnation,
            } => {
                self.fences.insert(*replica, *incarnation);
            }
            _ => return false,
        }
        true
    }

    /// After replay: a log without an incarnation predates them and ran admitted.
    pub fn finish_replay(&mut self) {
        if self.incarnation.is_none() {
            self.admitted = true;
        }
    }

    pub fn is_admitted(&self) -> bool {
        self.admitted
    }

    pub fn incarnation(&self) -> Option<u64> {
        self.incarnation
    }

    pub fn fences(&self) -> &BTreeMap<ReplicaId, u64> {
        &self.fences
    }

    /// What compaction keeps: all of it, always.
    pub fn records(&self, out: &mut Vec<Record>) {
        if let Some(incarnation) = self.incarnation {
            out.push(Record::Incarnation { incarnation });
        }
        if self.admitted && self.incarnation.is_some() {
            out.push(Record::Admitted);
        }
        for (&replica, &incarnation) in &self.fences {
            out.push(Record::Fence {
                replica,
                incarnation,
            });
        }
    }

    /// A peer's join. The answer may be sent once the returned record (if any) is durable.
    pub fn on_join(
        &mut self,
        from: ReplicaId,
        incarnation: u64,
        mode: JoinMode,
    ) -> (JoinAnswer, Option<Record>) {
        match self.fences.get(&from) {
            Some(&known) if known == incarnation => (JoinAnswer::Admitted, None),
            Some(&known) if mode != JoinMode::Rejoin => {
                (JoinAnswer::Known { incarnation: known }, None)
            }
            _ => (JoinAnswer::Admitted, Some(self.fence(from, incarnation))),
        }
    }

    /// A peer's own incarnation, from its answer to this replica's join: recorded where none
    /// is, never in place of another. Only the peer's own rejoin replaces a fence: a peer that
    /// answers under a new incarnation may be a lost log that has not been refused yet.
    pub fn learn(&mut self, from: ReplicaId, incarnation: u64) -> Option<Record> {
        self.answered.insert(from);
        // 0 names no life (a peer from before incarnations): nothing to fence.
        (incarnation != 0 && !self.fences.contains_key(&from))
            .then(|| self.fence(from, incarnation))
    }

    /// Whether a message from `from`'s `incarnation` may be heard: when it is the fenced one,
    /// or when none is (a replica learns every peer's incarnation when it joins, so only logs
    /// from before incarnations lack one). A message never records a fence: the first to
    /// arrive could be a stale process's.
    pub fn hears(&self, from: ReplicaId, incarnation: u64) -> bool {
        self.fences
            .get(&from)
            .is_none_or(|&known| known == incarnation)
    }

    /// Admits this life once every one of `peers` has answered its join, and not before: the
    /// one peer that remembers an earlier life may be the only one that can tell.
    pub fn admit_if_all(&mut self, mut peers: impl Iterator<Item = ReplicaId>) -> Option<Record> {
        if self.admitted || !peers.all(|p| self.answered.contains(&p)) {
            return None;
        }
        self.admitted = true;
        Some(Record::Admitted)
    }

    fn fence(&mut self, replica: ReplicaId, incarnation: u64) -> Record {
        self.fences.insert(replica, incarnation);
        Record::Fence {
            replica,
            incarnation,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fresh(incarnation: u64) -> Admission {
        let mut a = Admission::default();
        a.replay(&Record::Incarnation { incarnation });
        a.finish_replay();
        a
    }

    #[test]
    fn a_new_log_is_not_admitted_and_an_old_one_is() {
        assert!(!fresh(7).is_admitted());
        let mut legacy = Admission::default();
        legacy.finish_replay();
        assert!(legacy.is_admitted());
        let mut restarted = fresh(7);
        restarted.replay(&Record::Admitted);
        assert!(restarted.is_admitted());
    }

    #[test]
    fn a_lost_log_is_refused_by_a_peer_that_remembers_and_rejoin_replaces_the_fence() {
        let mut peer = fresh(1);
        // Replica 2's first life joins: recorded.
        let (answer, record) = peer.on_join(2, 20, JoinMode::First);
        assert_eq!(answer, JoinAnswer::Admitted);
        assert_eq!(
            record,
            Some(Record::Fence {
                replica: 2,
                incarnation: 20
            })
        );
        // Restarted mid-join: the same incarnation again is fine and writes nothing.
        assert_eq!(
            peer.on_join(2, 20, JoinMode::First),
            (JoinAnswer::Admitted, None)
        );
        // Its disk is lost; the new log claims to be new.
        assert_eq!(
            peer.on_join(2, 21, JoinMode::First),
            (JoinAnswer::Known { incarnation: 20 }, None)
        );
        // Messages of the lost life are still heard, the new one's are not.
        assert!(peer.hears(2, 20));
        assert!(!peer.hears(2, 21));
        // The operator's --rejoin replaces the fence: from now on the old life is not heard.
        let (answer, record) = peer.on_join(2, 21, JoinMode::Rejoin);
        assert_eq!(answer, JoinAnswer::Admitted);
        assert!(record.is_some());
        assert!(peer.hears(2, 21));
        assert!(!peer.hears(2, 20));
    }

    #[test]
    fn fences_survive_compaction_and_replay() {
        let mut a = fresh(5);
        a.on_join(0, 10, JoinMode::First);
        a.learn(2, 30);
        // Replica 0 has not answered this life's join: not admitted yet.
        assert!(a.admit_if_all([0, 2].into_iter()).is_none());
        a.learn(0, 10);
        assert_eq!(a.admit_if_all([0, 2].into_iter()), Some(Record::Admitted));
        let mut out = Vec::new();
        a.records(&mut out);
        let mut replayed = Admission::default();
        for r in &out {
            assert!(replayed.replay(r));
        }
        replayed.finish_replay();
        replayed.answered = a.answered.clone();
        assert_eq!(replayed, a);
        assert!(replayed.admit_if_all([0, 2].into_iter()).is_none());
    }

    #[test]
    fn messages_never_fence_and_an_answer_never_replaces_a_fence() {
        let mut a = fresh(5);
        // Unknown: heard, and nothing is recorded (the first to speak may be stale).
        assert!(a.hears(1, 9) && a.hears(1, 8));
        assert!(a.fences().is_empty());
        // A join's answer records the peer's incarnation once...
        assert!(a.learn(1, 9).is_some());
        assert!(a.hears(1, 9) && !a.hears(1, 8));
        // ...and another answer under a new one (a lost log not yet refused) changes nothing.
        assert_eq!(a.learn(1, 8), None);
        assert_eq!(a.fences().get(&1), Some(&9));
        // Only the peer's own rejoin does.
        assert_eq!(a.on_join(1, 8, JoinMode::Rejoin).0, JoinAnswer::Admitted);
        assert_eq!(a.fences().get(&1), Some(&8));
    }
}
