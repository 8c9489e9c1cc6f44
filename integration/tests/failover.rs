//! Step 2 end to end: three replicas (F = 1). The leader is killed with kill -9 at each step
//! of the protocol and another replica finishes the transaction; one replica down for good
//! does not stop commits; two down make Commit fail with Unavailable (outcome unknown) and
//! nothing is committed or aborted until a majority is back.

use anyhow::Result;
use paxos_commit_integration::bank::{self, TransferOutcome};
use paxos_commit_integration::cluster::{Cluster, Spec};
use paxos_commit_proto::client::ClientError;
use paxos_commit_proto::pb;
use std::time::{Duration, Instant};
use tonic::Code;

const A: &str = "bank_a";
const B: &str = "bank_b";

async fn three_replicas(mut spec: Spec) -> Result<Cluster> {
    spec.commit_timeout_ms = 4_000;
    spec.branch_timeout_ms = 4_000;
    let cluster = Cluster::start(spec).await?;
    bank::create_accounts(&cluster, 4, 100).await?;
    Ok(cluster)
}

async fn assert_settled(c: &Cluster, txid: &str) -> Result<pb::TxnState> {
    let start = Instant::now();
    // Panics (rather than returning the error) keep the test directory and its logs.
    if let Err(e) = c.wait_no_prepared(Duration::from_secs(10)).await {
        panic!("{e:#}");
    }
    let total: i64 = bank::totals(c).await?.values().sum();
    assert_eq!(total, 800, "money created or destroyed");
    let rows = bank::rows_of(c, txid).await?;
    let state = match c.wait_decided(txid, Duration::from_secs(10)).await {
        Ok(s) => s,
        Err(_) => pb::TxnState::Unknown,
    };
    match state {
        pb::TxnState::Committed => assert!(rows.values().all(|n| *n == 1), "{rows:?}"),
        _ => assert!(rows.values().all(|n| *n == 0), "{state:?} {rows:?}"),
    }
    eprintln!(
        "{txid}: {state:?} after {:?}, rows {rows:?}",
        start.elapsed()
    );
    Ok(state)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_killed_before_any_vote() -> Result<()> {
    let markers = tempfile::tempdir()?;
    let spec = Spec::new("leader-kill-a", 3, &[A, B]).crash_replica_at(
        0,
        "coordinator-before-prepare",
        &markers.path().join("r0"),
    );
    let c = three_replicas(spec).await?;
    let (txid, outcome) = bank::transfer(&c.client, (A, 1), (B, 1), 10).await?;
    c.replicas[0].wait_exit(Duration::from_secs(5))?;
    eprintln!("leader killed before prepare: client saw {outcome:?}");
    assert!(
        !matches!(outcome, TransferOutcome::Committed),
        "{outcome:?}"
    );
    // Nothing was prepared; the agents roll their open branches back on their own.
    assert_eq!(assert_settled(&c, &txid).await?, pb::TxnState::Unknown);
    assert_eq!(bank::balance(&c, A, 1).await?, 100);
    // Later transfers go to the surviving replicas.
    let (_, next) = bank::transfer(&c.client, (A, 2), (B, 2), 5).await?;
    assert_eq!(next, TransferOutcome::Committed);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_killed_after_an_acceptance() -> Result<()> {
    let markers = tempfile::tempdir()?;
    let spec = Spec::new("leader-kill-b", 3, &[A, B]).crash_replica_at(
        0,
        "coordinator-after-accept",
        &markers.path().join("r0"),
    );
    let c = three_replicas(spec).await?;
    let (txid, outcome) = bank::transfer(&c.client, (A, 1), (B, 1), 10).await?;
    c.replicas[0].wait_exit(Duration::from_secs(5))?;
    eprintln!("leader killed after its acceptor accepted a vote: client saw {outcome:?}");
    let state = assert_settled(&c, &txid).await?;
    // Whether the second agent got its Prepare before the leader died is a race. If both
    // votes reached a majority of acceptors (replicas 1 and 2), the takeover must find and
    // re-propose them: Commit. Otherwise it must choose Aborted for the missing vote.
    let status = c.status(&txid).await?;
    let all_prepared_at_majority = status.participants.len() == 2
        && status.participants.iter().all(|p| {
            p.votes
                .iter()
                .filter(|v| v.vote == pb::Vote::Prepared as i32)
                .count()
                >= 2
        });
    eprintln!("both votes at a majority: {all_prepared_at_majority}; decided {state:?}");
    if all_prepared_at_majority {
        assert_eq!(state, pb::TxnState::Committed);
    }
    assert!(matches!(
        state,
        pb::TxnState::Committed | pb::TxnState::Aborted
    ));
    if let (TransferOutcome::Aborted(why), pb::TxnState::Committed) = (&outcome, state) {
        panic!("client told aborted ({why}) for a committed transaction");
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn leader_killed_after_the_decision() -> Result<()> {
    let markers = tempfile::tempdir()?;
    let spec = Spec::new("leader-kill-c", 3, &[A, B]).crash_replica_at(
        0,
        "coordinator-after-decision",
        &markers.path().join("r0"),
    );
    let c = three_replicas(spec).await?;
    let (txid, outcome) = bank::transfer(&c.client, (A, 1), (B, 1), 10).await?;
    c.replicas[0].wait_exit(Duration::from_secs(5))?;
    eprintln!("leader killed after deciding: client saw {outcome:?}");
    assert_eq!(assert_settled(&c, &txid).await?, pb::TxnState::Committed);
    assert_eq!(bank::balance(&c, A, 1).await?, 90);
    assert_eq!(bank::balance(&c, B, 1).await?, 110);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn one_replica_down_for_good_commits_continue() -> Result<()> {
    let c = three_replicas(Spec::new("one-down", 3, &[A, B])).await?;
    c.replicas[2].kill9()?;
    for i in 0..20 {
        let (txid, outcome) =
            bank::transfer(&c.client, (A, 1 + i % 4), (B, 1 + (i + 1) % 4), 1).await?;
        assert_eq!(outcome, TransferOutcome::Committed, "{txid}");
    }
    // And with the first replica down instead (clients move to another one).
    c.restart_replica(2).await?;
    c.replicas[0].kill9()?;
    for i in 0..20 {
        let (txid, outcome) =
            bank::transfer(&c.client, (A, 1 + i % 4), (B, 1 + (i + 1) % 4), 1).await?;
        assert_eq!(outcome, TransferOutcome::Committed, "{txid}");
    }
    c.wait_no_prepared(Duration::from_secs(10)).await?;
    assert_eq!(bank::totals(&c).await?.values().sum::<i64>(), 800);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_of_three_down_blocks_safely_and_recovers() -> Result<()> {
    let c = three_replicas(Spec::new("two-down", 3, &[A, B])).await?;
    let txn = c.client.begin().await?;
    assert_eq!(txn.leader(), 0);
    txn.execute(
        A,
        "UPDATE accounts SET balance = balance - 7 WHERE id = 1",
        &[],
    )
    .await?;
    txn.execute(
        B,
        "UPDATE accounts SET balance = balance + 7 WHERE id = 1",
        &[],
    )
    .await?;
    c.replicas[1].kill9()?;
    c.replicas[2].kill9()?;
    let err = txn.commit().await.expect_err("no majority: no decision");
    eprintln!("commit with two of three replicas down: {err}");
    assert!(matches!(err, ClientError::OutcomeUnknown { .. }), "{err:?}");
    assert_eq!(err.code(), Some(Code::Unavailable));
    // Both branches are prepared and stay so: no agent decides on its own.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(c.prepared(A).await?.len(), 1);
    assert_eq!(c.prepared(B).await?.len(), 1);
    let status = c.status(txn.id()).await?;
    assert_eq!(status.state, pb::TxnState::InProgress as i32);
    // A majority is back: the transaction completes without anyone asking.
    c.restart_replica(1).await?;
    c.wait_no_prepared(Duration::from_secs(15)).await?;
    assert_eq!(
        c.wait_decided(txn.id(), Duration::from_secs(5)).await?,
        pb::TxnState::Committed
    );
    assert_eq!(bank::balance(&c, A, 1).await?, 93);
    assert_eq!(bank::balance(&c, B, 1).await?, 107);
    Ok(())
}

/// Open (unprepared) branches hold row locks, and only their leader knows the transaction:
/// when it dies before Commit, nobody else will abort it. The agents notice on their own
/// (an idle open branch asks its leader) and roll back, long before the branch timeout, so
/// the accounts are usable again in seconds; a statement sent to such a branch later fails
/// instead of opening a new branch without the rolled-back work.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn open_branches_of_a_dead_leader_release_their_locks() -> Result<()> {
    let mut spec = Spec::new("leader-kill-open", 3, &[A, B]);
    spec.commit_timeout_ms = 4_000;
    // The production default: far longer than this test may wait.
    spec.branch_timeout_ms = 120_000;
    let c = Cluster::start(spec).await?;
    bank::create_accounts(&c, 4, 100).await?;
    let debit = "UPDATE accounts SET balance = balance + $1 WHERE id = $2";

    let orphan = c.client.begin().await?;
    let leader = orphan.leader();
    for (p, delta) in [(A, -10i64), (B, 10)] {
        orphan
            .execute(p, debit, &[pb::Value::from(delta), pb::Value::from(1i64)])
            .await?;
    }
    c.replicas[leader].kill9()?;
    let killed = Instant::now();
    eprintln!(
        "{}: leader {leader} killed with both branches open",
        orphan.id()
    );

    // The same rows, through the surviving replicas: lock timeouts abort the first tries.
    let mut tries = 0;
    loop {
        tries += 1;
        let (_, outcome) = bank::transfer(&c.client, (A, 1), (B, 1), 5).await?;
        if outcome == TransferOutcome::Committed {
            break;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(30),
            "rows still locked {:?} after the leader died: {outcome:?}",
            killed.elapsed()
        );
    }
    eprintln!(
        "rows usable again {:?} after the kill ({tries} tries)",
        killed.elapsed()
    );
    for p in [A, B] {
        let idle: i64 = c
            .db(p)
            .await?
            .query_one(
                "SELECT count(*) FROM pg_stat_activity \
                 WHERE datname = $1 AND state LIKE 'idle in transaction%'",
                &[&p],
            )
            .await?
            .get(0);
        assert_eq!(
            idle, 0,
            "{p}: a session is still inside the orphaned branch"
        );
    }
    let late = orphan
        .execute(A, debit, &[pb::Value::from(-1i64), pb::Value::from(2i64)])
        .await
        .expect_err("a statement on a rolled-back branch must fail");
    eprintln!("late statement refused: {late}");
    assert_eq!(bank::balance(&c, A, 1).await?, 95);
    assert_eq!(bank::balance(&c, B, 1).await?, 105);
    assert_eq!(bank::balance(&c, A, 2).await?, 100);
    Ok(())
}
