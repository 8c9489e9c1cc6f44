//! Step 8, the client's part (issue 13): an Execute sent twice runs once (its sequence number
//! makes the repeat answer from memory), also when the repeat arrives while the first still
//! runs and when the reply is lost in the network and the client sends it again by itself;
//! and a `Transaction` dropped unfinished aborts, so its row locks go at once.

use anyhow::{bail, ensure, Context, Result};
use paxos_commit_core::Outcome;
use paxos_commit_integration::bank;
use paxos_commit_integration::cluster::{Cluster, Spec};
use paxos_commit_integration::proxy::Node;
use paxos_commit_proto::client::Client;
use paxos_commit_proto::pb;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use tonic::Code;

const A: &str = "bank_a";
const B: &str = "bank_b";
const BALANCE: i64 = 1_000;

/// What a debit returns: PostgreSQL's clock when it ran (µs), so that two answers that are
/// equal were given by one run.
const DEBIT: &str = "UPDATE accounts SET balance = balance - 10 WHERE id = $1 \
     RETURNING (extract(epoch from clock_timestamp()) * 1000000)::bigint AS ran_at";

async fn deployment(spec: Spec) -> Result<Cluster> {
    let c = Cluster::start(spec).await?;
    bank::create_accounts(&c, 4, BALANCE).await?;
    Ok(c)
}

fn request(txid: &str, seq: u64, sql: &str, params: Vec<pb::Value>) -> pb::ExecuteRequest {
    pb::ExecuteRequest {
        txid: txid.to_string(),
        sql: sql.to_string(),
        params,
        seq,
    }
}

fn expect_code<T: std::fmt::Debug>(
    what: &str,
    r: Result<T, tonic::Status>,
    code: Code,
) -> Result<tonic::Status> {
    match r {
        Ok(v) => bail!("{what}: accepted ({v:?}), expected {code:?}"),
        Err(s) => {
            eprintln!("{what}: {:?} {}", s.code(), s.message());
            ensure!(
                s.code() == code,
                "{what}: got {:?} ({}), expected {code:?}",
                s.code(),
                s.message()
            );
            Ok(s)
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_repeated_execute_runs_once() -> Result<()> {
    let c = deployment(Spec::new("client-repeat", 1, &[A, B])).await?;
    let mut agent = c.client.agent(A)?;

    // The same debit twice, then the next statement: one debit, two equal answers.
    let txn = c.client.begin().await?;
    let debit = request(txn.id(), 1, DEBIT, vec![1i64.into()]);
    let first = agent.execute(debit.clone()).await?.into_inner();
    let again = agent.execute(debit.clone()).await?.into_inner();
    ensure!(
        first == again,
        "two answers to one statement: {first:?} / {again:?}"
    );
    ensure!(first.rows.len() == 1, "{first:?}");
    let record = request(
        txn.id(),
        2,
        "INSERT INTO transfers VALUES ($1, 1, -10)",
        vec![txn.id().into()],
    );
    agent.execute(record.clone()).await?;
    // A stale duplicate, and another statement under a number already used, are refused
    // without harm.
    expect_code(
        "statement 1 after 2",
        agent.execute(debit.clone()).await,
        Code::FailedPrecondition,
    )?;
    let mut other = record.clone();
    other.sql = "INSERT INTO transfers VALUES ($1, 1, -20)".into();
    expect_code(
        "another statement as number 2",
        agent.execute(other).await,
        Code::FailedPrecondition,
    )?;
    let d = txn.commit().await?;
    ensure!(d.outcome == Outcome::Committed, "{d:?}");
    ensure!(
        bank::balance(&c, A, 1).await? == BALANCE - 10,
        "the debit did not run exactly once"
    );
    ensure!(bank::rows_of(&c, txn.id()).await?[A] == 1);

    // A gap: statement 5 after 1 is refused, and the transaction cannot commit without the
    // statements that never arrived.
    let txn = c.client.begin().await?;
    agent
        .execute(request(txn.id(), 1, DEBIT, vec![2i64.into()]))
        .await?;
    let s = expect_code(
        "statement 5 after 1",
        agent
            .execute(request(txn.id(), 5, DEBIT, vec![2i64.into()]))
            .await,
        Code::FailedPrecondition,
    )?;
    ensure!(
        s.message().contains("out of order") && s.message().contains("was 1"),
        "{}",
        s.message()
    );
    let d = txn.commit().await?;
    ensure!(d.outcome == Outcome::Aborted, "committed with a gap: {d:?}");
    ensure!(bank::balance(&c, A, 2).await? == BALANCE);
    // A first statement numbered 2 has nothing before it here.
    let txn = c.client.begin().await?;
    expect_code(
        "statement 2 first",
        agent
            .execute(request(txn.id(), 2, DEBIT, vec![2i64.into()]))
            .await,
        Code::FailedPrecondition,
    )?;
    txn.abort().await?;

    // Unnumbered (seq 0, clients from before): runs each time, as it always did.
    let txn = c.client.begin().await?;
    let legacy = request(txn.id(), 0, DEBIT, vec![3i64.into()]);
    agent.execute(legacy.clone()).await?;
    agent.execute(legacy).await?;
    let d = txn.commit().await?;
    ensure!(d.outcome == Outcome::Committed, "{d:?}");
    ensure!(bank::balance(&c, A, 3).await? == BALANCE - 20);

    // A repeat that arrives while the first still runs waits for it and gets its answer.
    let txn = c.client.begin().await?;
    let slow = request(
        txn.id(),
        1,
        "UPDATE accounts SET balance = balance - 10 FROM pg_sleep(1) WHERE id = $1 \
         RETURNING (extract(epoch from clock_timestamp()) * 1000000)::bigint AS ran_at",
        vec![4i64.into()],
    );
    let start = Instant::now();
    let first = tokio::spawn({
        let (mut agent, slow) = (agent.clone(), slow.clone());
        async move { agent.execute(slow).await }
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let repeat = agent.execute(slow).await?.into_inner();
    let both = start.elapsed();
    let first = first.await.context("first task")??.into_inner();
    ensure!(first == repeat, "{first:?} / {repeat:?}");
    eprintln!("a statement of 1 s and its repeat sent 0.3 s later: both answered in {both:?}");
    ensure!(
        both < Duration::from_millis(1_900),
        "the repeat ran again: {both:?}"
    );
    let d = txn.commit().await?;
    ensure!(d.outcome == Outcome::Committed, "{d:?}");
    ensure!(bank::balance(&c, A, 4).await? == BALANCE - 10);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_an_uncommitted_transaction_releases_its_locks() -> Result<()> {
    let c = deployment(Spec::new("client-drop", 1, &[A, B])).await?;
    let debit = "UPDATE accounts SET balance = balance - 1 WHERE id = $1";

    // An early `?`: the transaction goes out of scope with row 1 locked in both databases.
    let txn = c.client.begin().await?;
    let txid = txn.id().to_string();
    txn.execute(A, debit, &[1i64.into()]).await?;
    txn.execute(B, debit, &[1i64.into()]).await?;
    // Dropping a clone is not the end of it.
    drop(txn.clone());
    txn.execute(A, debit, &[2i64.into()]).await?;
    drop(txn);
    let dropped = Instant::now();
    for p in [A, B] {
        let db = c.db(p).await?;
        db.batch_execute("SET lock_timeout = '3s'").await?;
        db.execute(
            "UPDATE accounts SET balance = balance + 0 WHERE id = 1",
            &[],
        )
        .await
        .with_context(|| format!("row 1 of {p} still locked after the drop"))?;
        eprintln!("{p}: row free {:?} after the drop", dropped.elapsed());
    }
    let freed = dropped.elapsed();
    ensure!(
        freed < Duration::from_secs(1),
        "row locks held {freed:?} after the drop"
    );
    let state = c.wait_decided(&txid, Duration::from_secs(5)).await?;
    ensure!(state == pb::TxnState::Aborted, "{state:?}");
    for p in [A, B] {
        ensure!(bank::balance(&c, p, 1).await? == BALANCE);
    }

    // Detached: left open for a handle resumed elsewhere, which commits it.
    let txn = c.client.begin().await?;
    let leader = txn.leader();
    txn.execute(A, debit, &[4i64.into()]).await?;
    let txid = txn.detach();
    tokio::time::sleep(Duration::from_millis(500)).await;
    let d = c.client.transaction(&txid, leader).commit().await?;
    ensure!(
        d.outcome == Outcome::Committed,
        "a detached transaction: {d:?}"
    );
    ensure!(bank::balance(&c, A, 4).await? == BALANCE - 1);

    // Committed, then dropped: stays committed.
    let txn = c.client.begin().await?;
    let txid = txn.id().to_string();
    txn.execute(A, debit, &[3i64.into()]).await?;
    txn.execute(B, debit, &[3i64.into()]).await?;
    let d = txn.commit().await?;
    ensure!(d.outcome == Outcome::Committed, "{d:?}");
    drop(txn);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let s = c.status(&txid).await?;
    ensure!(s.state == pb::TxnState::Committed as i32, "{s:?}");
    for p in [A, B] {
        ensure!(bank::balance(&c, p, 3).await? == BALANCE - 1);
    }
    Ok(())
}

fn now_us() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_reply_is_sent_again_and_runs_once() -> Result<()> {
    let c = deployment(Spec::new("client-lost-reply", 1, &[A]).with_proxies(true)).await?;
    let net = c.net.clone().context("no proxies")?;
    let rpc_timeout = Duration::from_secs(1);
    let client = Client::new(&c.client_config(rpc_timeout))?;
    let txn = client.begin().await?;
    // Connected (TLS and HTTP/2 set up) before the network turns slow.
    txn.execute(A, "SELECT count(*) FROM accounts", &[]).await?;

    // Each way takes 0.7 s: the debit arrives and runs, its answer comes after the client's
    // 1 s deadline. The link recovers at 1 s, and the client's retry is answered from memory.
    let link = net.link(&Node::Client, &Node::Agent(A.into()));
    link.modify(|f| f.delay = Duration::from_millis(700));
    let heal = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_secs(1)).await;
        link.modify(|f| f.delay = Duration::ZERO);
    });
    let (sent, start) = (now_us(), Instant::now());
    let r = txn.execute(A, DEBIT, &[1i64.into()]).await?;
    let took = start.elapsed();
    heal.await?;
    let ran_at = r.rows[0].values[0].as_int().context("ran_at")?;
    let ran_after = Duration::from_micros((ran_at - sent).max(0) as u64);
    eprintln!(
        "the debit ran {ran_after:?} after it was sent; the client had its answer after {took:?}"
    );
    ensure!(
        took >= rpc_timeout,
        "the first reply was not lost ({took:?})"
    );
    ensure!(
        ran_after < rpc_timeout,
        "the answer is not the first attempt's: it ran {ran_after:?} after sending"
    );
    let d = txn.commit().await?;
    ensure!(d.outcome == Outcome::Committed, "{d:?}");
    ensure!(
        bank::balance(&c, A, 1).await? == BALANCE - 10,
        "the debit did not run exactly once"
    );
    Ok(())
}
