//! The acceptor: one per replica, holding every instance of every transaction it has seen.
//!
//! Per transaction it keeps a single promise (phase 1 always covers all instances of a
//! transaction, as in Gray & Lamport's Paxos Commit) and the value accepted per instance. Its
//! state is exactly what its durable records say, so a restarted replica replays them.

use crate::msg::{Msg, Record};
use crate::types::{ballot_in_range, Ballot, Outcome, Participant, TxnId, Vote, MAX_BALLOT};
use std::collections::BTreeMap;

/// What one acceptor knows of one transaction.
#[derive(Debug, Clone, Default, PartialEq, Eq, Hash)]
pub struct AcceptorTxn {
    /// The participant set R; empty while unknown.
    pub participants: Vec<Participant>,
    /// Highest ballot promised in phase 1 (or accepted in phase 2).
    pub promised: Ballot,
    /// Instance (participant id) → (ballot, value) last accepted.
    pub accepted: BTreeMap<String, (Ballot, Vote)>,
    /// The decision, once learned.
    pub decided: Option<Outcome>,
    /// Every participant applied the decision.
    pub finished: bool,
    /// When this replica first heard of the transaction (shell time, ms; not durable).
    pub since: u64,
}

/// The acceptor's answer to a phase 1a or 2a.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    /// The state changed: persist `record` (if any), then send `msg`.
    Accept { record: Option<Record>, msg: Msg },
    /// The ballot is below the promise.
    Reject { promised: Ballot },
    /// Not a message any honest proposer or participant sends (a ballot out of range, a
    /// vote for an instance outside R): nothing changes and nothing is answered.
    Ignore,
}

impl AcceptorTxn {
    fn learn_participants(&mut self, participants: &[Participant]) {
        if self.participants.is_empty() && !participants.is_empty() {
            self.participants = participants.to_vec();
        }
    }

    pub fn on_phase1a(
        &mut self,
        txn: TxnId,
        ballot: Ballot,
        participants: &[Participant],
    ) -> Reply {
        if !ballot_in_range(ballot) {
            return Reply::Ignore;
        }
        self.learn_participants(participants);
        if ballot < self.promised {
            return Reply::Reject {
                promised: self.promised,
            };
        }
        let record = (ballot > self.promised).then(|| Record::Promise {
            txn,
            ballot,
            participants: self.participants.clone(),
        });
        self.promised = ballot;
        // Always every instance: a proposer that learns R from this reply must not mistake
        // an unreported instance for one that accepted nothing.
        let accepted = self
            .accepted
            .iter()
            .map(|(p, (b, v))| (p.clone(), *b, *v))
            .collect();
        Reply::Accept {
            record,
            msg: Msg::Phase1b {
                txn,
                ballot,
                accepted,
                participants: self.participants.clone(),
            },
        }
    }

    pub fn on_phase2a(
        &mut self,
        txn: TxnId,
        participant: &str,
        ballot: Ballot,
        vote: Vote,
        participants: &[Participant],
    ) -> Reply {
        let in_r = |r: &[Participant]| r.is_empty() || r.iter().any(|p| p.id == participant);
        if !ballot_in_range(ballot) || !in_r(participants) {
            return Reply::Ignore;
        }
        self.learn_participants(participants);
        if !in_r(&self.participants) {
            // An instance outside R can never matter to the decision, and accepting a value
            // for it would only mislead whoever reads this acceptor's state (a takeover's
            // phase 1b, a status query) into counting it.
            return Reply::Ignore;
        }
        if ballot < self.promised {
            return Reply::Reject {
                promised: self.promised,
            };
        }
        if matches!(self.accepted.get(participant), Some((b, v)) if *b == ballot && *v != vote) {
            // One ballot carries one value. Ballot 0 belongs to the participant alone, and a
            // participant that (after a restart, or a bug) votes again differently must not
            // change what this acceptor reported: the first value may already be chosen.
            return Reply::Ignore;
        }
        self.promised = ballot;
        let fresh = self.accepted.get(participant) != Some(&(ballot, vote));
        let record = fresh.then(|| {
            self.accepted
                .insert(participant.to_string(), (ballot, vote));
            Record::Accept {
                txn,
                participant: participant.to_string(),
                ballot,
                vote,
                participants: self.participants.clone(),
            }
        });
        Reply::Accept {
            record,
            msg: Msg::Phase2b {
                txn,
                participant: participant.to_string(),
                ballot,
                vote,
            },
        }
    }

    /// Replays one durable record (recovery).
    ///
    /// A ballot above [`MAX_BALLOT`] cannot have been written by this code (the core never
    /// accepts one), so it means a corrupt or foreign log; it is clamped to `MAX_BALLOT`
    /// rather than dropped or trusted. Clamping keeps the promise above every ballot a
    /// proposer can use (those are below `MAX_BALLOT`), so the acceptor refuses exactly what
    /// the larger promise refused, and nothing downstream overflows on it.
    pub fn apply(&mut self, record: &Record) {
        match record {
            Record::Promise {
                ballot,
                participants,
                ..
            } => {
                let ballot = (*ballot).min(MAX_BALLOT);
                self.learn_participants(participants);
                self.promised = self.promised.max(ballot);
            }
            Record::Accept {
                participant,
                ballot,
                vote,
                participants,
                ..
            } => {
                let ballot = (*ballot).min(MAX_BALLOT);
                self.learn_participants(participants);
                self.promised = self.promised.max(ballot);
                let newer = self
                    .accepted
                    .get(participant)
                    .is_none_or(|(b, _)| *b <= ballot);
                if newer {
                    self.accepted.insert(participant.clone(), (ballot, *vote));
                }
            }
            Record::Decided {
                outcome,
                participants,
                ..
            } => {
                self.learn_participants(participants);
                self.decided = Some(*outcome);
            }
            Record::Finished { outcome, .. } => {
                self.decided = Some(*outcome);
                self.finished = true;
            }
            Record::Round { .. }
            | Record::Rejoined
            | Record::Incarnation { .. }
            | Record::Admitted
            | Record::Fence { .. } => {}
        }
    }

    /// The fewest records that rebuild this state (log compaction).
    pub fn records(&self, txn: TxnId, out: &mut Vec<Record>) {
        if self.finished {
            if let Some(outcome) = self.decided {
                out.push(Record::Finished { txn, outcome });
                return;
            }
        }
        if self.promised > 0 || self.accepted.is_empty() {
            out.push(Record::Promise {
                txn,
                ballot: self.promised,
                participants: self.participants.clone(),
            });
        }
        for (p, (ballot, vote)) in &self.accepted {
            out.push(Record::Accept {
                txn,
                participant: p.clone(),
                ballot: *ballot,
                vote: *vote,
                participants: self.participants.clone(),
            });
        }
        if let Some(outcome) = self.decided {
            out.push(Record::Decided {
                txn,
                outcome,
                participants: self.participants.clone(),
            });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn r() -> Vec<Participant> {
        vec![Participant::new("a", "x:1"), Participant::new("b", "x:2")]
    }

    #[test]
    fn ballot_zero_vote_is_refused_after_a_higher_promise() {
        let t = TxnId(1);
        let mut acc = AcceptorTxn::default();
        assert!(matches!(
            acc.on_phase1a(t, 4, &r()),
            Reply::Accept {
                record: Some(_),
                ..
            }
        ));
        assert_eq!(
            acc.on_phase2a(t, "a", 0, Vote::Prepared, &r()),
            Reply::Reject { promised: 4 }
        );
        assert!(acc.accepted.is_empty());
    }

    #[test]
    fn a_second_value_in_the_same_ballot_is_ignored() {
        let t = TxnId(1);
        let mut acc = AcceptorTxn::default();
        assert!(matches!(
            acc.on_phase2a(t, "a", 0, Vote::Prepared, &r()),
            Reply::Accept {
                record: Some(_),
                ..
            }
        ));
        assert_eq!(
            acc.on_phase2a(t, "a", 0, Vote::Aborted, &r()),
            Reply::Ignore
        );
        assert_eq!(acc.accepted.get("a"), Some(&(0, Vote::Prepared)));
        // A higher ballot may carry another value, as Paxos allows.
        assert!(matches!(
            acc.on_phase2a(t, "a", 3, Vote::Aborted, &r()),
            Reply::Accept { .. }
        ));
    }

    #[test]
    fn phase1b_reports_accepted_values_and_duplicates_write_nothing() {
        let t = TxnId(1);
        let mut acc = AcceptorTxn::default();
        let first = acc.on_phase2a(t, "a", 0, Vote::Prepared, &r());
        assert!(matches!(
            first,
            Reply::Accept {
                record: Some(_),
                ..
            }
        ));
        let dup = acc.on_phase2a(t, "a", 0, Vote::Prepared, &r());
        assert!(matches!(dup, Reply::Accept { record: None, .. }));
        match acc.on_phase1a(t, 3, &[]) {
            Reply::Accept {
                msg:
                    Msg::Phase1b {
                        accepted,
                        participants,
                        ..
                    },
                ..
            } => {
                assert_eq!(accepted, vec![("a".to_string(), 0, Vote::Prepared)]);
                assert_eq!(participants, r());
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    /// Regression: out-of-range ballots and votes for instances outside R change nothing.
    #[test]
    fn out_of_range_ballots_and_foreign_instances_are_ignored() {
        let t = TxnId(1);
        let mut acc = AcceptorTxn::default();
        assert_eq!(acc.on_phase1a(t, u64::MAX, &r()), Reply::Ignore);
        assert_eq!(acc.on_phase1a(t, MAX_BALLOT + 1, &r()), Reply::Ignore);
        assert_eq!(
            acc.on_phase2a(t, "a", u64::MAX, Vote::Aborted, &r()),
            Reply::Ignore
        );
        assert_eq!(acc, AcceptorTxn::default());
        // Not in the R the message carries, then not in the R the acceptor learned.
        assert_eq!(
            acc.on_phase2a(t, "z", 0, Vote::Aborted, &r()),
            Reply::Ignore
        );
        assert!(matches!(
            acc.on_phase2a(t, "a", 0, Vote::Prepared, &r()),
            Reply::Accept { .. }
        ));
        assert_eq!(acc.on_phase2a(t, "z", 0, Vote::Aborted, &[]), Reply::Ignore);
        assert_eq!(acc.accepted.len(), 1);
        assert!(matches!(
            acc.on_phase1a(t, MAX_BALLOT, &[]),
            Reply::Accept { .. }
        ));
    }

    /// Regression: replaying absurd ballots from a corrupt log clamps them, never panics.
    #[test]
    fn replay_clamps_absurd_ballots() {
        let t = TxnId(1);
        let mut acc = AcceptorTxn::default();
        acc.apply(&Record::Promise {
            txn: t,
            ballot: u64::MAX,
            participants: r(),
        });
        acc.apply(&Record::Accept {
            txn: t,
            participant: "a".into(),
            ballot: u64::MAX - 1,
            vote: Vote::Prepared,
            participants: r(),
        });
        assert_eq!(acc.promised, MAX_BALLOT);
        assert_eq!(acc.accepted["a"], (MAX_BALLOT, Vote::Prepared));
        // Every ballot a proposer can use is still refused.
        assert_eq!(
            acc.on_phase1a(t, MAX_BALLOT - 1, &[]),
            Reply::Reject {
                promised: MAX_BALLOT
            }
        );
    }

    #[test]
    fn records_rebuild_the_same_state() {
        let t = TxnId(9);
        let mut acc = AcceptorTxn::default();
        let mut log = Vec::new();
        for reply in [
            acc.on_phase2a(t, "a", 0, Vote::Prepared, &r()),
            acc.on_phase1a(t, 5, &r()),
            acc.on_phase2a(t, "b", 5, Vote::Aborted, &r()),
        ] {
            if let Reply::Accept {
                record: Some(rec), ..
            } = reply
            {
                log.push(rec);
            }
        }
        let mut replayed = AcceptorTxn::default();
        log.iter().for_each(|rec| replayed.apply(rec));
        assert_eq!(replayed, acc);
        let mut compact = Vec::new();
        acc.records(t, &mut compact);
        let mut again = AcceptorTxn::default();
        compact.iter().for_each(|rec| again.apply(rec));
        assert_eq!(again, acc);
    }
}
