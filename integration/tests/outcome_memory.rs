//! Issue 13's "GetStatus of a transaction committed 10 minutes earlier says committed", for
//! real: with a retention of one second, the replicas compact a transaction's full state away
//! almost at once, and only the outcome archive can still answer ten minutes later.
//!
//! It waits ten real minutes, so it is `#[ignore]`d in `cargo test --workspace`; `.ci/run`
//! runs it in the background while the rest of the suite runs
//! (`cargo test -p paxos-commit-integration --test outcome_memory -- --ignored`).

use anyhow::{ensure, Result};
use paxos_commit_integration::bank::{self, TransferOutcome};
use paxos_commit_integration::cluster::{Cluster, Spec};
use paxos_commit_proto::pb;
use std::time::{Duration, Instant};

const A: &str = "bank_a";
const B: &str = "bank_b";

/// How long after the decision GetStatus is asked; `PXC_OUTCOME_WAIT_SECS` shortens it for a
/// quick local run.
fn wait() -> Duration {
    let secs = std::env::var("PXC_OUTCOME_WAIT_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(600);
    Duration::from_secs(secs)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "waits ten minutes; .ci/run runs it in the background"]
async fn get_status_answers_ten_minutes_after_the_decision() -> Result<()> {
    let spec = Spec::new("outcome-memory", 3, &[A, B])
        .with_replica_env("PAXOS_COMMIT_RETENTION_MS", "1000");
    let c = Cluster::start(spec).await?;
    bank::create_accounts(&c, 4, 1_000).await?;

    let (committed, outcome) = bank::transfer(&c.client, (A, 1), (B, 2), 7).await?;
    assert_eq!(outcome, TransferOutcome::Committed);
    let txn = c.client.begin().await?;
    txn.execute(
        A,
        "UPDATE accounts SET balance = balance - 1 WHERE id = 3",
        &[],
    )
    .await?;
    txn.abort().await?;
    let aborted = txn.id().to_string();
    let decided_at = Instant::now();

    // The full state is compacted away within seconds on every replica.
    tokio::time::sleep(Duration::from_secs(5)).await;
    for i in 0..3 {
        let info = c
            .operator
            .replica(i)
            .expect("three replicas")
            .cluster_info(pb::Empty {})
            .await?
            .into_inner();
        ensure!(
            info.decided_retained == 0,
            "replica {i} still holds {} decided transactions",
            info.decided_retained
        );
    }

    let left = wait().saturating_sub(decided_at.elapsed());
    eprintln!("waiting {left:?} before asking GetStatus");
    tokio::time::sleep(left).await;
    for (txid, want) in [
        (&committed, pb::TxnState::Committed),
        (&aborted, pb::TxnState::Aborted),
    ] {
        let s = c.status(txid).await?;
        eprintln!(
            "{txid}, decided {:?} ago: {:?}",
            decided_at.elapsed(),
            pb::TxnState::try_from(s.state)
        );
        assert_eq!(pb::TxnState::try_from(s.state), Ok(want), "{txid}: {s:?}");
        assert!(!s.expired, "{txid}: {s:?}");
    }
    Ok(())
}
