//! The transfer workload, run three ways over the same databases so that the only
//! difference between modes is how the transaction is committed.
//!
//! A transfer over N databases is one `UPDATE accounts SET balance = balance + $1 WHERE
//! id = $2` per database: a random "home" database is debited `amount * (N - 1)` on a random
//! account, and every other database is credited `amount` on a random account. So every mode
//! runs exactly N single-row updates per transfer, and the distributed modes run exactly one
//! per database:
//!
//! - `local`: the N updates in the home database, one plain transaction (no 2PC at all);
//! - `raw-2pc`: the client is its own transaction manager: BEGIN + UPDATE on every database
//!   in parallel, then PREPARE TRANSACTION on every database in parallel, then COMMIT
//!   PREPARED on every database in parallel (what any TM must do, with nothing made durable
//!   outside PostgreSQL, so nothing survives the TM's crash);
//! - `paxos-fF`: the paxos-commit client: Begin, the N Executes in parallel, Commit.

use futures::future::join_all;
use hdrhistogram::Histogram;
use paxos_commit_core::Outcome;
use paxos_commit_proto::client::{Client, ClientError};
use paxos_commit_proto::pb;
use rand::Rng;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio_postgres::Statement;

pub const UPDATE_SQL: &str = "UPDATE accounts SET balance = balance + $1 WHERE id = $2";

/// The same lock timeout the agent sets on its branches: a deadlock that spans two databases
/// is invisible to PostgreSQL, so a waiter must give up by itself.
const BEGIN_SQL: &str = "BEGIN; SET LOCAL lock_timeout = '2000ms'";

/// One transfer: per database, the account and the change of its balance.
#[derive(Debug, Clone)]
pub struct Plan {
    pub home: usize,
    pub accounts: Vec<i32>,
    pub deltas: Vec<i64>,
}

impl Plan {
    pub fn random(databases: usize, accounts: i32) -> Plan {
        let mut rng = rand::rng();
        let home = rng.random_range(0..databases);
        let amount: i64 = rng.random_range(1..=100);
        let spread = amount * (databases as i64 - 1);
        Plan {
            home,
            accounts: (0..databases)
                .map(|_| rng.random_range(1..=accounts))
                .collect(),
            deltas: (0..databases)
                .map(|i| if i == home { -spread } else { amount })
                .collect(),
        }
    }
}

/// How one transfer ended.
#[derive(Debug)]
pub enum Ending {
    Committed,
    /// Rolled back cleanly: a refused statement or PREPARE, or the group decided Abort.
    Aborted(String),
    /// The client could not learn the outcome (paxos-commit's OutcomeUnknown).
    Unknown(String),
    /// Transport or protocol error.
    Error(String),
}

/// One transfer's ending and the time spent in each of its phases.
pub struct Timed {
    pub ending: Ending,
    pub phases: Vec<Duration>,
}

/// A direct connection to one database with the update statement prepared on it.
pub struct DbConn {
    pub client: tokio_postgres::Client,
    pub update: Statement,
}

impl DbConn {
    pub async fn connect(url: &str) -> anyhow::Result<DbConn> {
        let client = paxos_commit_integration::pg::connect_url(url).await?;
        let update = client.prepare(UPDATE_SQL).await?;
        Ok(DbConn { client, update })
    }
}

/// Connections of one client task: one per database, index = database.
pub type TaskConns = Vec<DbConn>;

/// How a mode runs one transfer.
#[derive(Clone)]
pub enum Driver {
    Local,
    Raw2pc,
    Paxos {
        client: Client,
        participants: Arc<Vec<String>>,
        commit_fast: bool,
    },
}

impl Driver {
    /// The phases whose durations [`Driver::run`] reports, in order.
    pub fn phase_names(&self) -> &'static [&'static str] {
        match self {
            Driver::Local => &["execute", "commit"],
            Driver::Raw2pc => &["execute", "prepare", "commit"],
            Driver::Paxos { .. } => &["begin", "execute", "commit"],
        }
    }

    /// Runs one transfer. `conns` are the task's direct connections (unused by paxos modes);
    /// `gid` is unique to this transfer (used by raw-2pc).
    pub async fn run(&self, conns: Option<&TaskConns>, plan: &Plan, gid: &str) -> Timed {
        match (self, conns) {
            (Driver::Local, Some(conns)) => local(conns, plan).await,
            (Driver::Raw2pc, Some(conns)) => raw_2pc(conns, plan, gid).await,
            (
                Driver::Paxos {
                    client,
                    participants,
                    commit_fast,
                },
                _,
            ) => paxos(client, participants, plan, *commit_fast).await,
            (_, None) => Timed {
                ending: Ending::Error("no database connections for a direct mode".into()),
                phases: Vec::new(),
            },
        }
    }
}

/// A failed statement inside PostgreSQL rolls the transaction back cleanly (an abort); a
/// broken connection is an error.
fn pg_ending(e: &tokio_postgres::Error) -> Ending {
    if e.as_db_error().is_some() {
        Ending::Aborted(e.to_string())
    } else {
        Ending::Error(e.to_string())
    }
}

async fn local(conns: &TaskConns, plan: &Plan) -> Timed {
    let db = &conns[plan.home];
    let start = Instant::now();
    // Updates in account order, so two transfers of this mode cannot deadlock on one
    // database (the distributed modes touch one row per database, which cannot).
    let mut rows: Vec<(i32, i64)> = plan
        .accounts
        .iter()
        .copied()
        .zip(plan.deltas.iter().copied())
        .collect();
    rows.sort_unstable();
    let executed = async {
        db.client.batch_execute(BEGIN_SQL).await?;
        // Issued together: tokio-postgres pipelines them on the one connection, the way the
        // distributed modes run their updates in parallel.
        for r in join_all(rows.iter().map(|(account, delta)| async move {
            db.client.execute(&db.update, &[delta, account]).await
        }))
        .await
        {
            r?;
        }
        Ok::<(), tokio_postgres::Error>(())
    }
    .await;
    let executed_at = Instant::now();
    if let Err(e) = executed {
        let _ = db.client.batch_execute("ROLLBACK").await;
        return Timed {
            ending: pg_ending(&e),
            phases: vec![executed_at - start],
        };
    }
    let committed = db.client.batch_execute("COMMIT").await;
    let phases = vec![executed_at - start, executed_at.elapsed()];
    Timed {
        ending: match committed {
            Ok(()) => Ending::Committed,
            Err(e) => pg_ending(&e),
        },
        phases,
    }
}

async fn raw_2pc(conns: &TaskConns, plan: &Plan, gid: &str) -> Timed {
    let start = Instant::now();
    let executed = join_all(conns.iter().enumerate().map(|(i, db)| async move {
        db.client.batch_execute(BEGIN_SQL).await?;
        db.client
            .execute(&db.update, &[&plan.deltas[i], &plan.accounts[i]])
            .await?;
        Ok::<(), tokio_postgres::Error>(())
    }))
    .await;
    let executed_at = Instant::now();
    if let Some(Err(e)) = executed.iter().find(|r| r.is_err()) {
        let ending = pg_ending(e);
        join_all(conns.iter().map(|db| db.client.batch_execute("ROLLBACK"))).await;
        return Timed {
            ending,
            phases: vec![executed_at - start],
        };
    }

    let gids: Vec<String> = (0..conns.len()).map(|i| format!("{gid}-{i}")).collect();
    let prepared = join_all(conns.iter().zip(&gids).map(|(db, g)| async move {
        db.client
            .batch_execute(&format!("PREPARE TRANSACTION '{g}'"))
            .await
    }))
    .await;
    let prepared_at = Instant::now();
    if let Some(Err(e)) = prepared.iter().find(|r| r.is_err()) {
        // The decision is Abort: undo what did prepare; a refused PREPARE already rolled back.
        let ending = pg_ending(e);
        join_all(conns.iter().zip(&gids).zip(&prepared).map(|((db, g), p)| {
            let sql = if p.is_ok() {
                format!("ROLLBACK PREPARED '{g}'")
            } else {
                "ROLLBACK".to_string()
            };
            async move { db.client.batch_execute(&sql).await }
        }))
        .await;
        return Timed {
            ending,
            phases: vec![executed_at - start, prepared_at - executed_at],
        };
    }

    let committed = join_all(conns.iter().zip(&gids).map(|(db, g)| async move {
        db.client
            .batch_execute(&format!("COMMIT PREPARED '{g}'"))
            .await
    }))
    .await;
    let phases = vec![
        executed_at - start,
        prepared_at - executed_at,
        prepared_at.elapsed(),
    ];
    let ending = match committed.into_iter().find_map(Result::err) {
        None => Ending::Committed,
        // Decided Commit but not applied everywhere: not an abort.
        Some(e) => Ending::Error(format!("COMMIT PREPARED: {e}")),
    };
    Timed { ending, phases }
}

async fn paxos(client: &Client, participants: &[String], plan: &Plan, commit_fast: bool) -> Timed {
    let start = Instant::now();
    let txn = match client.begin().await {
        Ok(t) => t,
        Err(e) => {
            return Timed {
                ending: Ending::Error(format!("begin: {e}")),
                phases: Vec::new(),
            }
        }
    };
    let begun_at = Instant::now();
    let executed = join_all(participants.iter().enumerate().map(|(i, p)| {
        let txn = &txn;
        async move {
            txn.execute(
                p,
                UPDATE_SQL,
                &[
                    pb::Value::from(plan.deltas[i]),
                    pb::Value::from(i64::from(plan.accounts[i])),
                ],
            )
            .await
        }
    }))
    .await;
    let executed_at = Instant::now();
    if let Some(Err(e)) = executed.iter().find(|r| r.is_err()) {
        let reason = e.to_string();
        let ending = match txn.abort().await {
            Ok(_) => Ending::Aborted(reason),
            Err(ClientError::OutcomeUnknown { status, .. }) => {
                Ending::Unknown(status.message().to_string())
            }
            Err(abort) => Ending::Error(format!("{reason}; then abort: {abort}")),
        };
        return Timed {
            ending,
            phases: vec![begun_at - start, executed_at - begun_at],
        };
    }
    let decided = if commit_fast {
        txn.commit_fast().await
    } else {
        txn.commit().await
    };
    let phases = vec![
        begun_at - start,
        executed_at - begun_at,
        executed_at.elapsed(),
    ];
    let ending = match decided {
        Ok(d) if d.outcome == Outcome::Committed => Ending::Committed,
        Ok(d) => Ending::Aborted(d.reason),
        Err(ClientError::OutcomeUnknown { status, .. }) => {
            Ending::Unknown(status.message().to_string())
        }
        Err(e) => Ending::Error(format!("commit: {e}")),
    };
    Timed { ending, phases }
}

/// Latency histogram in microseconds, 1 µs to 10 minutes at 3 significant digits.
pub fn histogram() -> anyhow::Result<Histogram<u64>> {
    Ok(Histogram::new_with_bounds(1, 600_000_000, 3)?)
}

pub fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros()).unwrap_or(u64::MAX).max(1)
}
