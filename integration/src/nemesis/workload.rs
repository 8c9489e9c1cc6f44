//! The nemesis test's clients: concurrent tasks transferring money between accounts spread
//! over the databases, recording for every attempt what the client was told, so that the
//! checker can hold each answer against what the databases really hold.
//!
//! A transfer here differs from [`crate::bank::transfer`] in two ways the checker needs:
//! every attempt that got a transaction id keeps it, whatever failed afterwards (an error is
//! recorded as an unknown outcome, never as an abort the client was not told about), and the
//! two accounts are updated in a fixed order, so that transfers do not deadlock each other
//! across databases (PostgreSQL cannot see such deadlocks; they end in lock timeouts that
//! would blur the availability figure).

use paxos_commit_core::Outcome;
use paxos_commit_proto::client::{Client, ClientError};
use paxos_commit_proto::pb;
use rand::rngs::StdRng;
use rand::seq::IndexedRandom;
use rand::{Rng, SeedableRng};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::task::JoinHandle;

/// One account update of a transfer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Step {
    pub participant: String,
    pub account: i32,
    pub delta: i64,
}

/// What the client was told.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reported {
    Committed,
    /// Aborted, with the reason the coordinator gave.
    Aborted(String),
    /// The client could not learn the outcome (or got an error that does not say it).
    Unknown(String),
    /// Begin failed: there is no transaction.
    NotBegun(String),
}

/// One transfer attempt.
#[derive(Clone, Debug)]
pub struct Attempt {
    pub client: usize,
    pub txid: Option<String>,
    pub steps: Vec<Step>,
    /// Deliberately larger than any balance: the database must refuse it.
    pub overdraft: bool,
    /// Since the run's t0.
    pub start: Duration,
    pub end: Duration,
    pub reported: Reported,
}

/// The workload's shape.
#[derive(Clone, Debug)]
pub struct Mix {
    pub participants: Vec<String>,
    pub accounts: i32,
    pub max_amount: i64,
    /// Share of transfers within one database (one participant).
    pub single_db: f64,
    /// Share of transfers bound to fail the CHECK (balance >= 0).
    pub overdraft: f64,
    /// Pause between a client's transfers, at most.
    pub think: Duration,
}

/// Running clients.
pub struct Workload {
    stop: Arc<AtomicBool>,
    tasks: Vec<JoinHandle<()>>,
    attempts: Arc<Mutex<Vec<Attempt>>>,
}

impl Workload {
    /// Starts `clients` tasks sharing `client`. `leader` is kept up to date with the replica the
    /// last Begin landed on (the nemesis cuts that one from its agents).
    pub fn start(
        clients: usize,
        seed: u64,
        mix: Mix,
        client: Client,
        t0: Instant,
        leader: Arc<AtomicUsize>,
    ) -> Workload {
        let stop = Arc::new(AtomicBool::new(false));
        let attempts = Arc::new(Mutex::new(Vec::new()));
        let tasks = (0..clients)
            .map(|k| {
                let rng = StdRng::seed_from_u64(
                    seed ^ (0x9E37_79B9_7F4A_7C15u64.wrapping_mul(k as u64 + 1)),
                );
                tokio::spawn(client_loop(
                    k,
                    rng,
                    mix.clone(),
                    client.clone(),
                    t0,
                    leader.clone(),
                    stop.clone(),
                    attempts.clone(),
                ))
            })
            .collect();
        Workload {
            stop,
            tasks,
            attempts,
        }
    }

    /// Attempts finished so far.
    pub fn count(&self) -> usize {
        self.attempts.lock().map(|a| a.len()).unwrap_or(0)
    }

    /// Lets in-flight transfers finish, stops the clients and returns every attempt.
    pub async fn stop(self) -> Vec<Attempt> {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            let _ = t.await;
        }
        let mut attempts = match self.attempts.lock() {
            Ok(mut a) => std::mem::take(&mut *a),
            Err(p) => std::mem::take(&mut *p.into_inner()),
        };
        attempts.sort_by_key(|a| a.start);
        attempts
    }
}

#[allow(clippy::too_many_arguments)]
async fn client_loop(
    k: usize,
    mut rng: StdRng,
    mix: Mix,
    client: Client,
    t0: Instant,
    leader: Arc<AtomicUsize>,
    stop: Arc<AtomicBool>,
    attempts: Arc<Mutex<Vec<Attempt>>>,
) {
    while !stop.load(Ordering::Relaxed) {
        let (steps, overdraft) = draw(&mut rng, &mix);
        let start = t0.elapsed();
        let (txid, reported) = transfer(&client, &steps, &leader).await;
        let end = t0.elapsed();
        let not_begun = matches!(reported, Reported::NotBegun(_));
        let attempt = Attempt {
            client: k,
            txid,
            steps,
            overdraft,
            start,
            end,
            reported,
        };
        if let Ok(mut a) = attempts.lock() {
            a.push(attempt);
        }
        // Without a replica to begin on, retrying at once would only spin.
        let pause = if not_begun {
            Duration::from_millis(100)
        } else {
            mix.think.mul_f64(rng.random::<f64>())
        };
        tokio::time::sleep(pause).await;
    }
}

/// Two distinct accounts and an amount; the steps come in a fixed (participant, account)
/// order so that concurrent transfers take row locks in the same order.
fn draw(rng: &mut StdRng, mix: &Mix) -> (Vec<Step>, bool) {
    let from_db = mix.participants.choose(rng).cloned().unwrap_or_default();
    let to_db = if rng.random_bool(mix.single_db) || mix.participants.len() < 2 {
        from_db.clone()
    } else {
        let others: Vec<&String> = mix.participants.iter().filter(|p| **p != from_db).collect();
        others.choose(rng).map(|s| (*s).clone()).unwrap_or_default()
    };
    let from = rng.random_range(1..=mix.accounts);
    let mut to = rng.random_range(1..=mix.accounts);
    if from_db == to_db && mix.accounts > 1 {
        while to == from {
            to = rng.random_range(1..=mix.accounts);
        }
    }
    let overdraft = rng.random_bool(mix.overdraft);
    let amount = if overdraft {
        1_000_000_000
    } else {
        rng.random_range(1..=mix.max_amount)
    };
    let mut steps = vec![
        Step {
            participant: from_db,
            account: from,
            delta: -amount,
        },
        Step {
            participant: to_db,
            account: to,
            delta: amount,
        },
    ];
    steps.sort_by(|a, b| (&a.participant, a.account).cmp(&(&b.participant, b.account)));
    (steps, overdraft)
}

/// One transfer: Begin, an update and a tagged insert per step, Commit. A failed statement
/// aborts the transaction.
pub async fn transfer(
    client: &Client,
    steps: &[Step],
    leader: &AtomicUsize,
) -> (Option<String>, Reported) {
    let txn = match client.begin().await {
        Ok(t) => t,
        Err(e) => return (None, Reported::NotBegun(e.to_string())),
    };
    leader.store(txn.leader(), Ordering::Relaxed);
    let txid = txn.id().to_string();
    for s in steps {
        let account = pb::Value::from(i64::from(s.account));
        let delta = pb::Value::from(s.delta);
        let update = txn
            .execute(
                &s.participant,
                "UPDATE accounts SET balance = balance + $1 WHERE id = $2",
                &[delta.clone(), account.clone()],
            )
            .await;
        let tagged = match update {
            Ok(_) => {
                txn.execute(
                    &s.participant,
                    "INSERT INTO transfers (txid, account, delta) VALUES ($1, $2, $3)",
                    &[pb::Value::from(txid.as_str()), account, delta],
                )
                .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = tagged {
            let reported = match txn.abort().await {
                Ok(d) => decided(d.outcome, format!("{e}; abort: {}", d.reason)),
                Err(abort_err) => Reported::Unknown(format!("{e}; abort failed: {abort_err}")),
            };
            return (Some(txid), reported);
        }
    }
    let reported = match txn.commit().await {
        Ok(d) => decided(d.outcome, d.reason),
        Err(e @ ClientError::OutcomeUnknown { .. }) => Reported::Unknown(e.to_string()),
        Err(e) => Reported::Unknown(format!("commit failed: {e}")),
    };
    (Some(txid), reported)
}

fn decided(outcome: Outcome, reason: String) -> Reported {
    match outcome {
        Outcome::Committed => Reported::Committed,
        Outcome::Aborted => Reported::Aborted(reason),
    }
}
