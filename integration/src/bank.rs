//! The bank workload shared by tests, the demo and the benchmark: accounts spread over
//! participant databases, and transfers that debit one and credit another atomically.
//!
//! Every transfer also writes a row tagged with its transaction id into each database it
//! touches, so a checker can tell, per transaction, whether it landed everywhere or nowhere.

use crate::cluster::Cluster;
use anyhow::{Context, Result};
use paxos_commit_core::Outcome;
use paxos_commit_proto::client::{Client, ClientError};
use paxos_commit_proto::pb;
use std::collections::BTreeMap;
use tonic::Code;

pub const SCHEMA: &str = "
    CREATE TABLE IF NOT EXISTS accounts (
        id      int PRIMARY KEY,
        balance bigint NOT NULL CHECK (balance >= 0)
    );
    CREATE TABLE IF NOT EXISTS transfers (
        txid    text   NOT NULL,
        account int    NOT NULL,
        delta   bigint NOT NULL
    );
    CREATE INDEX IF NOT EXISTS transfers_txid ON transfers (txid);
";

/// Creates `accounts` accounts of `balance` in every participant's database.
pub async fn create_accounts(cluster: &Cluster, accounts: i32, balance: i64) -> Result<()> {
    cluster.setup_sql(SCHEMA).await?;
    for p in cluster.pgs.keys() {
        cluster
            .db(p)
            .await?
            .execute(
                "INSERT INTO accounts SELECT g, $1 FROM generate_series(1, $2) g",
                &[&balance, &accounts],
            )
            .await
            .with_context(|| format!("creating accounts on {p}"))?;
    }
    Ok(())
}

/// How one transfer ended, as the client saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TransferOutcome {
    Committed,
    /// Aborted, with the reason (e.g. the balance would go negative).
    Aborted(String),
    /// The client could not learn the outcome; GetStatus settles it later.
    Unknown(String),
}

/// One side of a transfer: (participant, account id).
pub type Side<'a> = (&'a str, i32);

/// Moves `amount` from one account to another, each possibly in a different database.
pub async fn transfer(
    client: &Client,
    from: Side<'_>,
    to: Side<'_>,
    amount: i64,
) -> Result<(String, TransferOutcome), ClientError> {
    let txn = client.begin().await?;
    let txid = txn.id().to_string();
    let steps: [(Side<'_>, i64); 2] = [(from, -amount), (to, amount)];
    for ((p, account), delta) in steps {
        let update = txn
            .execute(
                p,
                "UPDATE accounts SET balance = balance + $1 WHERE id = $2",
                &[pb::Value::from(delta), pb::Value::from(i64::from(account))],
            )
            .await;
        let tag = match update {
            Ok(_) => {
                txn.execute(
                    p,
                    "INSERT INTO transfers (txid, account, delta) VALUES ($1, $2, $3)",
                    &[
                        pb::Value::from(txid.as_str()),
                        pb::Value::from(i64::from(account)),
                        pb::Value::from(delta),
                    ],
                )
                .await
            }
            Err(e) => Err(e),
        };
        if let Err(e) = tag {
            // A refused statement (CHECK violation, lost branch...) dooms the transaction.
            return match txn.abort().await {
                Ok(d) => Ok((txid, outcome_of(d.outcome, e.to_string()))),
                Err(ClientError::OutcomeUnknown { status, .. }) => {
                    Ok((txid, TransferOutcome::Unknown(status.message().to_string())))
                }
                Err(abort_err) => {
                    if abort_err.code() == Some(Code::NotFound) {
                        // The leader never knew it (restarted): nothing can have prepared.
                        Ok((txid, TransferOutcome::Aborted(e.to_string())))
                    } else {
                        Ok((txid, TransferOutcome::Unknown(abort_err.to_string())))
                    }
                }
            };
        }
    }
    match txn.commit().await {
        Ok(d) => Ok((txid, outcome_of(d.outcome, d.reason))),
        Err(ClientError::OutcomeUnknown { status, .. }) => {
            Ok((txid, TransferOutcome::Unknown(status.message().to_string())))
        }
        Err(e) => Err(e),
    }
}

fn outcome_of(outcome: Outcome, reason: String) -> TransferOutcome {
    match outcome {
        Outcome::Committed => TransferOutcome::Committed,
        Outcome::Aborted => TransferOutcome::Aborted(reason),
    }
}

/// Total balance per participant database.
pub async fn totals(cluster: &Cluster) -> Result<BTreeMap<String, i64>> {
    let mut out = BTreeMap::new();
    for p in cluster.pgs.keys() {
        let row = cluster
            .db(p)
            .await?
            .query_one("SELECT coalesce(sum(balance), 0)::int8 FROM accounts", &[])
            .await?;
        out.insert(p.clone(), row.get(0));
    }
    Ok(out)
}

/// Rows tagged with `txid` per participant.
pub async fn rows_of(cluster: &Cluster, txid: &str) -> Result<BTreeMap<String, i64>> {
    let mut out = BTreeMap::new();
    for p in cluster.pgs.keys() {
        let row = cluster
            .db(p)
            .await?
            .query_one("SELECT count(*) FROM transfers WHERE txid = $1", &[&txid])
            .await?;
        out.insert(p.clone(), row.get(0));
    }
    Ok(out)
}

/// Balance of one account.
pub async fn balance(cluster: &Cluster, p: &str, account: i32) -> Result<i64> {
    let row = cluster
        .db(p)
        .await?
        .query_one("SELECT balance FROM accounts WHERE id = $1", &[&account])
        .await?;
    Ok(row.get(0))
}
