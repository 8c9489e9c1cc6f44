//! Step 1 end to end, with F = 0 (one replica: classic 2PC on the Paxos Commit code path):
//! transfers across two real PostgreSQL databases through real agent and coordinator
//! processes, including kill -9 of an agent and of the coordinator mid-protocol.

use anyhow::Result;
use paxos_commit_core::Outcome;
use paxos_commit_integration::bank::{self, TransferOutcome};
use paxos_commit_integration::cluster::{Cluster, Spec};
use paxos_commit_proto::client::ClientError;
use paxos_commit_proto::pb::{self, ErrorReason};
use std::time::Duration;
use tonic::Code;

const A: &str = "bank_a";
const B: &str = "bank_b";

async fn bank_cluster(spec: Spec, accounts: i32, balance: i64) -> Result<Cluster> {
    let cluster = Cluster::start(spec).await?;
    bank::create_accounts(&cluster, accounts, balance).await?;
    Ok(cluster)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn transfer_commits_on_both_databases() -> Result<()> {
    let c = bank_cluster(Spec::new("commit", 1, &[A, B]), 2, 100).await?;
    let (txid, outcome) = bank::transfer(&c.client, (A, 1), (B, 2), 30).await?;
    assert_eq!(outcome, TransferOutcome::Committed);
    // Commit answers after every participant applied: a read right after sees it.
    assert_eq!(bank::balance(&c, A, 1).await?, 70);
    assert_eq!(bank::balance(&c, B, 2).await?, 130);
    let total: i64 = bank::totals(&c).await?.values().sum();
    assert_eq!(total, 400);
    let rows = bank::rows_of(&c, &txid).await?;
    assert_eq!(rows.values().copied().collect::<Vec<_>>(), vec![1, 1]);
    let status = c.status(&txid).await?;
    assert_eq!(status.state, pb::TxnState::Committed as i32);
    assert_eq!(status.participants.len(), 2);
    assert!(status.participants.iter().all(|p| p.applied));

    // A transaction with no statement commits at once: nothing to prepare, nothing to apply.
    let empty = c.client.begin().await?;
    let started = std::time::Instant::now();
    let d = empty.commit().await?;
    assert_eq!(d.outcome, Outcome::Committed);
    assert!(d.all_applied && d.not_applied.is_empty(), "{d:?}");
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "an empty commit took {:?}",
        started.elapsed()
    );
    c.wait_no_prepared(Duration::from_secs(5)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn check_violation_aborts_on_both() -> Result<()> {
    let c = bank_cluster(Spec::new("check", 1, &[A, B]), 2, 100).await?;
    // Credit first so that bank_b holds an executed statement when bank_a refuses the debit.
    let (txid, outcome) = bank::transfer(&c.client, (A, 1), (B, 1), 500).await?;
    assert!(
        matches!(&outcome, TransferOutcome::Aborted(r) if r.contains("check")),
        "{outcome:?}"
    );
    assert_eq!(bank::balance(&c, A, 1).await?, 100);
    assert_eq!(bank::balance(&c, B, 1).await?, 100);
    let rows = bank::rows_of(&c, &txid).await?;
    assert!(rows.values().all(|n| *n == 0), "{rows:?}");

    // The same through the voting phase: the debit passes its statement (no CHECK yet
    // violated) on one side while the other side's statement fails.
    let txn = c.client.begin().await?;
    txn.execute(
        B,
        "UPDATE accounts SET balance = balance + 10 WHERE id = 2",
        &[],
    )
    .await?;
    let err = txn
        .execute(
            A,
            "UPDATE accounts SET balance = balance - 1000 WHERE id = 2",
            &[],
        )
        .await
        .expect_err("CHECK (balance >= 0) must refuse");
    assert_eq!(err.code(), Some(Code::FailedPrecondition), "{err}");
    let decision = txn.commit().await?;
    assert_eq!(decision.outcome, Outcome::Aborted, "{decision:?}");
    assert_eq!(bank::balance(&c, B, 2).await?, 100);
    assert_eq!(bank::balance(&c, A, 2).await?, 100);
    c.wait_no_prepared(Duration::from_secs(5)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn client_abort_leaves_nothing() -> Result<()> {
    let c = bank_cluster(Spec::new("abort", 1, &[A, B]), 2, 100).await?;
    let txn = c.client.begin().await?;
    txn.execute(
        A,
        "UPDATE accounts SET balance = balance - 5 WHERE id = 1",
        &[],
    )
    .await?;
    txn.execute(
        B,
        "UPDATE accounts SET balance = balance + 5 WHERE id = 1",
        &[],
    )
    .await?;
    let d = txn.abort().await?;
    assert_eq!(d.outcome, Outcome::Aborted);
    assert_eq!(bank::balance(&c, A, 1).await?, 100);
    assert_eq!(bank::balance(&c, B, 1).await?, 100);
    // The branches are gone: their connections no longer hold row locks.
    let db = c.db(A).await?;
    db.batch_execute("SET lock_timeout = '1s'; UPDATE accounts SET balance = balance WHERE id = 1")
        .await?;
    let status = c.status(txn.id()).await?;
    assert_eq!(status.state, pb::TxnState::Aborted as i32);
    c.wait_no_prepared(Duration::from_secs(5)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_killed_after_prepare_finishes_as_decided() -> Result<()> {
    let markers = tempfile::tempdir()?;
    // bank_b dies right after PREPARE TRANSACTION, before its vote left: the group cannot
    // have chosen Prepared for it, so recovery must choose Aborted.
    let mut spec = Spec::new("agent-kill-prepare", 1, &[A, B]).crash_agent_at(
        B,
        "agent-after-prepare",
        &markers.path().join("b"),
    );
    spec.commit_timeout_ms = 3_000;
    let c = bank_cluster(spec, 2, 100).await?;
    let (txid, outcome) = bank::transfer(&c.client, (A, 1), (B, 1), 10).await?;
    let agent = c.agent(B)?;
    agent.wait_exit(Duration::from_secs(10))?;
    let prepared = c.prepared(B).await?;
    eprintln!("after kill -9 of bank_b: {txid} → {outcome:?}; bank_b prepared: {prepared:?}");
    assert_eq!(
        prepared.len(),
        1,
        "bank_b must still hold the prepared branch"
    );
    assert_eq!(outcome, TransferOutcome::Aborted(outcome_reason(&outcome)));
    c.restart_agent(B).await?;
    c.wait_no_prepared(Duration::from_secs(15)).await?;
    assert_eq!(bank::balance(&c, A, 1).await?, 100);
    assert_eq!(bank::balance(&c, B, 1).await?, 100);
    assert!(bank::rows_of(&c, &txid).await?.values().all(|n| *n == 0));
    Ok(())
}

fn outcome_reason(o: &TransferOutcome) -> String {
    match o {
        TransferOutcome::Aborted(r) => r.clone(),
        _ => String::new(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_killed_after_its_vote_commits_after_restart() -> Result<()> {
    let markers = tempfile::tempdir()?;
    // bank_b voted Prepared and dies as the decision arrives, before COMMIT PREPARED: the
    // group decided Commit, and the restarted agent must find its prepared branch and
    // commit it.
    let mut spec = Spec::new("agent-kill-vote", 1, &[A, B]).crash_agent_at(
        B,
        "agent-before-finish",
        &markers.path().join("b"),
    );
    spec.commit_timeout_ms = 3_000;
    let c = bank_cluster(spec, 2, 100).await?;
    let (txid, outcome) = bank::transfer(&c.client, (A, 1), (B, 1), 10).await?;
    c.agent(B)?.wait_exit(Duration::from_secs(10))?;
    let prepared = c.prepared(B).await?;
    eprintln!("after kill -9 of bank_b: {txid} → {outcome:?}; bank_b prepared: {prepared:?}");
    assert_eq!(outcome, TransferOutcome::Committed);
    assert_eq!(prepared.len(), 1);
    assert_eq!(bank::balance(&c, A, 1).await?, 90);
    c.restart_agent(B).await?;
    c.wait_no_prepared(Duration::from_secs(15)).await?;
    assert_eq!(bank::balance(&c, B, 1).await?, 110);
    assert_eq!(
        bank::rows_of(&c, &txid)
            .await?
            .values()
            .copied()
            .collect::<Vec<_>>(),
        vec![1, 1]
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn coordinator_killed_after_decision_recovers_and_finishes() -> Result<()> {
    let markers = tempfile::tempdir()?;
    let spec = Spec::new("coord-kill", 1, &[A, B]).crash_replica_at(
        0,
        "coordinator-after-decision",
        &markers.path().join("r0"),
    );
    let c = bank_cluster(spec, 2, 100).await?;
    let result = bank::transfer(&c.client, (A, 1), (B, 1), 10).await;
    c.replicas[0].wait_exit(Duration::from_secs(10))?;
    let (txid, outcome) = result?;
    let prepared_a = c.prepared(A).await?;
    let prepared_b = c.prepared(B).await?;
    eprintln!(
        "after kill -9 of the coordinator: {txid} → {outcome:?}; prepared: a={prepared_a:?} b={prepared_b:?}"
    );
    assert!(
        matches!(outcome, TransferOutcome::Unknown(_)),
        "{outcome:?}"
    );
    assert_eq!((prepared_a.len(), prepared_b.len()), (1, 1));
    c.restart_replica(0).await?;
    c.wait_no_prepared(Duration::from_secs(15)).await?;
    assert_eq!(
        c.wait_decided(&txid, Duration::from_secs(5)).await?,
        pb::TxnState::Committed
    );
    assert_eq!(bank::balance(&c, A, 1).await?, 90);
    assert_eq!(bank::balance(&c, B, 1).await?, 110);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_transfers_conserve_the_total() -> Result<()> {
    let c = bank_cluster(Spec::new("concurrent", 1, &[A, B]), 10, 1_000).await?;
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200u64 {
        let client = c.client.clone();
        tasks.spawn(async move {
            let (from, to) = if i % 2 == 0 { (A, B) } else { (B, A) };
            let a = 1 + (i * 7 % 10) as i32;
            let b = 1 + (i * 3 % 10) as i32;
            // Contention on 20 rows makes some branches time out on row locks (there is no
            // deadlock detection across databases); a client retries those.
            let mut attempt = 0;
            loop {
                let r = bank::transfer(&client, (from, a), (to, b), 1 + (i % 50) as i64).await;
                match &r {
                    Ok((_, TransferOutcome::Aborted(why)))
                        if why.contains("lock timeout") && attempt < 20 =>
                    {
                        attempt += 1;
                        tokio::time::sleep(Duration::from_millis(10 * attempt)).await;
                    }
                    _ => break r,
                }
            }
        });
    }
    let (mut committed, mut aborted) = (0, 0);
    while let Some(r) = tasks.join_next().await {
        match r?? {
            (_, TransferOutcome::Committed) => committed += 1,
            (_, TransferOutcome::Aborted(_)) => aborted += 1,
            (txid, TransferOutcome::Unknown(why)) => panic!("{txid} unknown: {why}"),
        }
    }
    eprintln!("200 concurrent transfers: {committed} committed, {aborted} aborted");
    assert_eq!(committed + aborted, 200);
    assert!(committed > 0);
    let total: i64 = bank::totals(&c).await?.values().sum();
    assert_eq!(total, 20_000);
    c.wait_no_prepared(Duration::from_secs(10)).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn bad_input_gets_a_clear_status_and_applies_nothing() -> Result<()> {
    let c = bank_cluster(Spec::new("bad-input", 1, &[A, B]), 2, 100).await?;

    // Unknown transaction id (well formed), on the coordinator and on an agent.
    let ghost = c.client.transaction("00000000deadbeef", 0);
    let err = ghost.commit().await.expect_err("unknown txid");
    assert!(
        matches!(&err, ClientError::Rpc(s) | ClientError::OutcomeUnknown { status: s, .. } if s.code() == Code::NotFound),
        "{err:?}"
    );
    assert_eq!(err.reason(), Some(ErrorReason::UnknownTransaction), "{err}");
    let err = ghost
        .execute(A, "UPDATE accounts SET balance = 0", &[])
        .await
        .expect_err("unknown txid on an agent");
    assert_eq!(err.code(), Some(Code::NotFound), "{err}");
    assert_eq!(err.reason(), Some(ErrorReason::UnknownTransaction), "{err}");

    // A malformed txid.
    let err = c
        .client
        .transaction("not-a-txid", 0)
        .execute(A, "SELECT 1", &[])
        .await
        .expect_err("malformed txid");
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    assert_eq!(err.reason(), Some(ErrorReason::InvalidArgument), "{err}");

    // Malformed SQL: refused, and the transaction can only abort.
    let txn = c.client.begin().await?;
    txn.execute(
        A,
        "UPDATE accounts SET balance = balance - 1 WHERE id = 1",
        &[],
    )
    .await?;
    let err = txn
        .execute(B, "UPDAT accounts SET", &[])
        .await
        .expect_err("syntax error");
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    assert!(err.to_string().contains("syntax"), "{err}");
    // Refused by the agent's own parser, before PostgreSQL saw it.
    assert_eq!(err.reason(), Some(ErrorReason::StatementRefused), "{err}");
    let d = txn.commit().await?;
    assert_eq!(d.outcome, Outcome::Aborted);
    eprintln!("aborted: {d:?}");
    // The cause is the failed statement's own.
    assert_eq!(d.cause_reason(), ErrorReason::StatementRefused, "{d:?}");
    assert_eq!(d.cause.as_ref().map(|c| c.participant.as_str()), Some(B));

    // Transaction control smuggled into a branch.
    let txn = c.client.begin().await?;
    let err = txn
        .execute(A, "COMMIT", &[])
        .await
        .expect_err("COMMIT refused");
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    assert_eq!(err.reason(), Some(ErrorReason::StatementRefused), "{err}");
    txn.abort().await?;

    // Wrong parameter count.
    let txn = c.client.begin().await?;
    let err = txn
        .execute(
            A,
            "UPDATE accounts SET balance = $1 WHERE id = $2",
            &[pb::Value::from(1)],
        )
        .await
        .expect_err("parameter count");
    assert_eq!(err.code(), Some(Code::InvalidArgument), "{err}");
    assert_eq!(err.reason(), Some(ErrorReason::InvalidArgument), "{err}");
    txn.abort().await?;

    // Execute after Commit.
    let txn = c.client.begin().await?;
    txn.execute(
        A,
        "UPDATE accounts SET balance = balance + 0 WHERE id = 2",
        &[],
    )
    .await?;
    assert_eq!(txn.commit().await?.outcome, Outcome::Committed);
    for p in [A, B] {
        let err = txn
            .execute(p, "UPDATE accounts SET balance = 0 WHERE id = 2", &[])
            .await
            .expect_err("execute after commit");
        assert_eq!(err.code(), Some(Code::FailedPrecondition), "{p}: {err}");
        assert_eq!(
            err.reason(),
            Some(ErrorReason::TransactionClosed),
            "{p}: {err}"
        );
    }

    // An unknown participant.
    let txn = c.client.begin().await?;
    let err = txn
        .execute("bank_zz", "SELECT 1", &[])
        .await
        .expect_err("unknown participant");
    assert!(matches!(err, ClientError::UnknownParticipant(_)), "{err}");
    assert_eq!(err.reason(), Some(ErrorReason::UnknownParticipant), "{err}");
    txn.abort().await?;

    // Nothing was applied anywhere.
    assert_eq!(bank::totals(&c).await?.values().sum::<i64>(), 400);
    assert_eq!(bank::balance(&c, A, 1).await?, 100);
    assert_eq!(bank::balance(&c, A, 2).await?, 100);
    c.wait_no_prepared(Duration::from_secs(5)).await
}
