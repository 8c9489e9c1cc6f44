//! Why participants voted Aborted, as they said with their votes (`Phase2a.cause`), so that a
//! client learns "prepared transactions exhausted at bank_b" rather than only "bank_b did not
//! prepare", and can decide from it whether to run the transaction again.
//!
//! Informative only: the protocol decides from the vote, never from its cause, so a lost or
//! forgotten cause costs a less precise answer and nothing else. Bounded: the oldest are
//! dropped first.

use paxos_commit_core::TxnId;
use paxos_commit_proto::pb;
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;

/// Causes kept at most; far more than the transactions decided in the time a client waits.
const CAPACITY: usize = 16_384;
/// A cause's message is for people; longer ones are cut.
const MAX_MESSAGE: usize = 1_024;

#[derive(Default)]
pub struct Causes {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    by_vote: HashMap<(TxnId, String), pb::Cause>,
    order: VecDeque<(TxnId, String)>,
}

impl Causes {
    /// Records `participant`'s cause for its Aborted vote on `txn` (the caller checked that
    /// the vote is that participant's own).
    pub fn record(&self, txn: TxnId, participant: &str, cause: &pb::Cause) {
        let mut cause = cause.clone();
        cause.participant = participant.to_string();
        if cause.sqlstate.len() != 5 || !cause.sqlstate.bytes().all(|b| b.is_ascii_alphanumeric()) {
            cause.sqlstate.clear();
        }
        if cause.message.len() > MAX_MESSAGE {
            let mut end = MAX_MESSAGE;
            while !cause.message.is_char_boundary(end) {
                end -= 1;
            }
            cause.message.truncate(end);
        }
        let key = (txn, participant.to_string());
        let mut inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        if inner.by_vote.insert(key.clone(), cause).is_none() {
            inner.order.push_back(key);
        }
        while inner.order.len() > CAPACITY {
            if let Some(old) = inner.order.pop_front() {
                inner.by_vote.remove(&old);
            }
        }
    }

    pub fn get(&self, txn: TxnId, participant: &str) -> Option<pb::Cause> {
        let inner = self.inner.lock().unwrap_or_else(|p| p.into_inner());
        inner.by_vote.get(&(txn, participant.to_string())).cloned()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn causes_are_bounded_and_cleaned() {
        let causes = Causes::default();
        let cause = pb::Cause {
            reason: pb::ErrorReason::PreparedTransactionsExhausted as i32,
            participant: "someone else".into(),
            sqlstate: "53200; DROP".into(),
            message: "é".repeat(MAX_MESSAGE),
        };
        causes.record(TxnId(1), "bank_a", &cause);
        let got = causes.get(TxnId(1), "bank_a").unwrap();
        assert_eq!(got.participant, "bank_a");
        assert_eq!(got.sqlstate, "");
        assert!(got.message.len() <= MAX_MESSAGE);
        for i in 0..CAPACITY as u64 + 10 {
            causes.record(TxnId(100 + i), "bank_a", &cause);
        }
        assert!(causes.get(TxnId(1), "bank_a").is_none());
        assert!(causes.get(TxnId(100 + CAPACITY as u64), "bank_a").is_some());
    }
}
