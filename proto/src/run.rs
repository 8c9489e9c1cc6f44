//! The closure API: `client.run(|txn| async move { ... })` begins, runs the closure,
//! commits, and does what a correct caller of begin / execute / commit must otherwise write
//! by hand: abort on error, run the whole transaction again when it failed for a cause that
//! passes (a deadlock, a lock timeout, prepared transactions exhausted, a replica restarting),
//! and settle an unknown outcome by asking GetStatus rather than handing it to the caller.
//!
//! Running again is safe because a transaction that aborted left no effect anywhere; one
//! whose outcome is unknown is never run again before GetStatus says it aborted.

use crate::client::{Client, ClientError, Decision, Transaction};
use crate::pb;
use paxos_commit_core::Outcome;
use rand::Rng;
use std::future::Future;
use std::time::Duration;
use tokio::time::Instant;

/// How `run` retries.
#[derive(Debug, Clone)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub max_attempts: u32,
    /// The back-off before the second attempt; doubled for each next one, up to
    /// `max_backoff`, and drawn uniformly below that bound ("full jitter": clients that
    /// collided do not collide again in step).
    pub first_backoff: Duration,
    pub max_backoff: Duration,
    /// How long an unknown outcome is asked after (GetStatus every `poll_interval`) before
    /// `run` gives up and returns [`ClientError::OutcomeUnknown`].
    pub settle_timeout: Duration,
    pub poll_interval: Duration,
    /// No new attempt starts after this much time since the first.
    pub budget: Duration,
}

impl Default for RetryPolicy {
    fn default() -> RetryPolicy {
        RetryPolicy {
            max_attempts: 10,
            first_backoff: Duration::from_millis(20),
            max_backoff: Duration::from_secs(2),
            settle_timeout: Duration::from_secs(60),
            poll_interval: Duration::from_millis(200),
            budget: Duration::from_secs(60),
        }
    }
}

impl RetryPolicy {
    /// The pause before attempt `attempt + 1` (`attempt` ≥ 1).
    fn backoff(&self, attempt: u32) -> Duration {
        let doubled = self
            .first_backoff
            .saturating_mul(1u32 << (attempt - 1).min(20));
        let bound = doubled.min(self.max_backoff);
        let micros = u64::try_from(bound.as_micros()).unwrap_or(u64::MAX);
        Duration::from_micros(rand::rng().random_range(0..=micros))
    }
}

/// What `run_with` returns besides the closure's value.
#[derive(Debug, Clone)]
pub struct Ran<T> {
    pub value: T,
    /// The transaction that committed.
    pub txid: String,
    /// Attempts made, this one included.
    pub attempts: u32,
    pub decision: Decision,
}

/// How one attempt ended.
enum Attempt<T> {
    Committed(T, Decision),
    /// Worth another attempt, for this reason.
    Again(ClientError),
    Failed(ClientError),
}

impl Client {
    /// Runs `f` in a transaction and commits it, retrying with the default [`RetryPolicy`];
    /// returns what `f` returned once the transaction committed.
    ///
    /// `f` may be called several times, each time with a new transaction: everything it does
    /// to the databases must go through that transaction. An error from `f` aborts the
    /// transaction; it is retried if transient ([`ClientError::is_transient`]), returned
    /// otherwise ([`ClientError::application`] wraps an application's own errors). A commit
    /// decided Aborted is retried when its cause is transient, else returned as
    /// [`ClientError::Aborted`].
    pub async fn run<T, F, Fut>(&self, f: F) -> Result<T, ClientError>
    where
        F: FnMut(Transaction) -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        self.run_with(&RetryPolicy::default(), f)
            .await
            .map(|ran| ran.value)
    }

    /// [`Client::run`] with a policy of one's own, telling how it went.
    pub async fn run_with<T, F, Fut>(
        &self,
        policy: &RetryPolicy,
        mut f: F,
    ) -> Result<Ran<T>, ClientError>
    where
        F: FnMut(Transaction) -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let started = Instant::now();
        let mut attempt = 1;
        loop {
            let (txid, result) = self.attempt(policy, &mut f).await;
            let error = match result {
                Attempt::Committed(value, decision) => {
                    return Ok(Ran {
                        value,
                        txid,
                        attempts: attempt,
                        decision,
                    })
                }
                Attempt::Failed(e) => return Err(e),
                Attempt::Again(e) => e,
            };
            let pause = policy.backoff(attempt);
            if attempt >= policy.max_attempts || started.elapsed() + pause > policy.budget {
                return Err(error);
            }
            tracing::info!(
                txid,
                attempt,
                reason = ?error.reason(),
                "transaction failed for a transient cause ({error}); running it again in {} ms",
                pause.as_millis()
            );
            tokio::time::sleep(pause).await;
            attempt += 1;
        }
    }

    async fn attempt<T, F, Fut>(&self, policy: &RetryPolicy, f: &mut F) -> (String, Attempt<T>)
    where
        F: FnMut(Transaction) -> Fut,
        Fut: Future<Output = Result<T, ClientError>>,
    {
        let txn = match self.begin().await {
            Ok(txn) => txn,
            Err(e) => return (String::new(), classify(e)),
        };
        let txid = txn.id().to_string();
        let value = match f(txn.clone()).await {
            Ok(value) => value,
            Err(e) => {
                // Awaited, unlike a drop's: the next attempt should not meet this one's locks.
                if let Err(abort) = txn.abort().await {
                    tracing::debug!(txid, "abort after a failed attempt: {abort}");
                }
                return (txid, classify(e));
            }
        };
        let decided = match txn.commit().await {
            Ok(d) => Ok(d),
            Err(ClientError::OutcomeUnknown { txid, status }) => {
                self.settle(policy, &txid, status).await
            }
            Err(e) => Err(e),
        };
        let result = match decided {
            Ok(d) if d.outcome == Outcome::Committed => Attempt::Committed(value, d),
            Ok(decision) => classify(ClientError::Aborted {
                txid: txid.clone(),
                decision: Box::new(decision),
            }),
            Err(e) => classify(e),
        };
        (txid, result)
    }

    /// Asks GetStatus until the transaction is decided or `settle_timeout` passes.
    async fn settle(
        &self,
        policy: &RetryPolicy,
        txid: &str,
        first: tonic::Status,
    ) -> Result<Decision, ClientError> {
        let deadline = Instant::now() + policy.settle_timeout;
        loop {
            if let Ok(s) = self.status(txid).await {
                let decided = |outcome| Decision {
                    outcome,
                    reason: String::new(),
                    all_applied: false,
                    not_applied: Vec::new(),
                    cause: None,
                };
                match pb::TxnState::try_from(s.state) {
                    Ok(pb::TxnState::Committed) => return Ok(decided(Outcome::Committed)),
                    Ok(pb::TxnState::Aborted) => {
                        let mut d = decided(Outcome::Aborted);
                        d.reason = "aborted (learned from GetStatus after the commit's \
                                    outcome was unknown)"
                            .into();
                        // Whatever it was, it aborted and left nothing: a new attempt is
                        // safe, and the likeliest cause (a replica lost mid-commit) passes.
                        d.cause = Some(pb::Cause {
                            reason: pb::ErrorReason::ReplicaUnavailable as i32,
                            ..Default::default()
                        });
                        return Ok(d);
                    }
                    _ => {}
                }
            }
            if Instant::now() + policy.poll_interval > deadline {
                return Err(ClientError::OutcomeUnknown {
                    txid: txid.to_string(),
                    status: first,
                });
            }
            tokio::time::sleep(policy.poll_interval).await;
        }
    }
}

fn classify<T>(e: ClientError) -> Attempt<T> {
    if e.is_transient() {
        Attempt::Again(e)
    } else {
        Attempt::Failed(e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_its_bound_and_is_jittered_below_it() {
        let p = RetryPolicy {
            first_backoff: Duration::from_millis(10),
            max_backoff: Duration::from_millis(100),
            ..RetryPolicy::default()
        };
        for attempt in 1..40 {
            let bound = Duration::from_millis((10u64 << (attempt - 1).min(20)).min(100));
            for _ in 0..50 {
                assert!(p.backoff(attempt) <= bound, "attempt {attempt}");
            }
        }
        let spread: std::collections::BTreeSet<_> = (0..50).map(|_| p.backoff(5)).collect();
        assert!(spread.len() > 10, "not jittered: {spread:?}");
    }
}
