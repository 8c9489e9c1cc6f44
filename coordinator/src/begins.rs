//! Idempotent Begin: a client that sends Begin again with the same key (its reply was lost,
//! its process restarted) gets the transaction the first Begin started, not a second one
//! that would hold an open-transaction slot until its deadline.
//!
//! Keys belong to the caller's certificate, so that one client cannot learn or join
//! another's transaction by guessing its key, and to this replica: the replica that began a
//! transaction leads it and is the one to ask. They are kept in memory for the retention
//! window after the transaction's deadline, and at most [`CAPACITY`] of them.

use paxos_commit_core::TxnId;
use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

/// The longest key accepted, in bytes.
pub const MAX_KEY_BYTES: usize = 128;
/// Keys kept at most; the oldest go first.
const CAPACITY: usize = 65_536;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Begun {
    pub txn: TxnId,
    pub deadline_unix_ms: u64,
}

#[derive(Default)]
pub struct Begins {
    by_key: HashMap<(String, String), (Begun, Instant)>,
    order: VecDeque<(String, String)>,
}

impl Begins {
    /// The transaction `caller` began with `key`, if it is remembered.
    pub fn get(&mut self, caller: &str, key: &str, now: Instant) -> Option<Begun> {
        let k = (caller.to_string(), key.to_string());
        match self.by_key.get(&k) {
            Some((begun, until)) if *until > now => Some(*begun),
            Some(_) => {
                self.by_key.remove(&k);
                None
            }
            None => None,
        }
    }

    /// Remembers that `caller`'s `key` began `begun`, until `keep` from `now`.
    pub fn insert(&mut self, caller: &str, key: &str, begun: Begun, now: Instant, keep: Duration) {
        let k = (caller.to_string(), key.to_string());
        if self.by_key.insert(k.clone(), (begun, now + keep)).is_none() {
            self.order.push_back(k);
        }
        while self.order.len() > CAPACITY {
            if let Some(old) = self.order.pop_front() {
                self.by_key.remove(&old);
            }
        }
        // Expired keys leave the queue as it turns over.
        while let Some(front) = self.order.front() {
            match self.by_key.get(front) {
                Some((_, until)) if *until > now => break,
                _ => {
                    if let Some(old) = self.order.pop_front() {
                        self.by_key.remove(&old);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_is_the_callers_and_lasts_its_window() {
        let mut b = Begins::default();
        let now = Instant::now();
        let begun = Begun {
            txn: TxnId(7),
            deadline_unix_ms: 1,
        };
        b.insert("client/a", "k1", begun, now, Duration::from_secs(10));
        assert_eq!(b.get("client/a", "k1", now), Some(begun));
        assert_eq!(b.get("client/b", "k1", now), None, "another caller's key");
        assert_eq!(b.get("client/a", "k2", now), None);
        assert_eq!(b.get("client/a", "k1", now + Duration::from_secs(11)), None);
        for i in 0..CAPACITY + 5 {
            b.insert("c", &i.to_string(), begun, now, Duration::from_secs(10));
        }
        assert!(b.by_key.len() <= CAPACITY && b.order.len() <= CAPACITY);
    }
}
