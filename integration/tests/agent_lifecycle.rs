//! Step 7, the agent's part: an agent stops when told (SIGTERM under load: it exits 0 within
//! the bound, rolls back its open branches so their row locks go, leaves its prepared ones to
//! recovery, and no transfer is split), and an agent started again serves at once (the first
//! Execute after a restart enlists without waiting out a lost answer).

use anyhow::{ensure, Context, Result};
use paxos_commit_integration::bank::{self, TransferOutcome};
use paxos_commit_integration::cluster::{Cluster, Spec};
use paxos_commit_proto::client::{Client, Transaction};
use paxos_commit_proto::pb;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

const A: &str = "bank_a";
const B: &str = "bank_b";
/// Accounts the load moves money between.
const LOADED: i32 = 20;
/// An account only the lock test touches.
const HELD: i32 = LOADED + 1;
const BALANCE: i64 = 1_000;
/// What the issue asks of a stop: well under 10 s, under load.
const STOP_BOUND: Duration = Duration::from_secs(10);
/// The first statement after a restart must not wait out a lost enlistment (2 s).
const FIRST_EXECUTE_BOUND: Duration = Duration::from_millis(1_000);

async fn deployment(name: &str) -> Result<Cluster> {
    let mut spec = Spec::new(name, 3, &[A, B]);
    spec.commit_timeout_ms = 4_000;
    let c = Cluster::start(spec).await?;
    bank::create_accounts(&c, HELD, BALANCE).await?;
    Ok(c)
}

/// Clients moving money between `bank_a` and `bank_b` in a loop until told to stop.
struct Load {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<Vec<(String, TransferOutcome)>>>,
}

impl Load {
    fn start(client: &Client, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let tasks = (0..clients)
            .map(|k| {
                let (client, stop) = (client.clone(), stop.clone());
                tokio::spawn(async move {
                    let mut done = Vec::new();
                    let mut n = 0i32;
                    while !stop.load(Ordering::Relaxed) {
                        n += 1;
                        let x = 1 + (k as i32 * 7 + n) % LOADED;
                        let y = 1 + (k as i32 * 3 + 2 * n) % LOADED;
                        let (from, to) = if n % 2 == 0 {
                            ((A, x), (B, y))
                        } else {
                            ((B, x), (A, y))
                        };
                        match bank::transfer(&client, from, to, 1).await {
                            Ok(r) => done.push(r),
                            // Begin failed (nothing started) or a Commit error other than an
                            // unknown outcome: nothing to check, go on.
                            Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
                        }
                    }
                    done
                })
            })
            .collect();
        Load { stop, tasks }
    }

    async fn finish(self) -> Result<Vec<(String, TransferOutcome)>> {
        self.stop.store(true, Ordering::Relaxed);
        let mut all = Vec::new();
        for t in self.tasks {
            all.extend(t.await.context("a load task panicked")?);
        }
        Ok(all)
    }
}

/// Nothing of ours prepared anywhere, money conserved, and every transfer in both databases
/// or in neither (and in both when the client was told it committed).
async fn assert_no_split(c: &Cluster, done: &[(String, TransferOutcome)]) -> Result<()> {
    if let Err(e) = c.wait_no_prepared(Duration::from_secs(30)).await {
        panic!("{e:#}");
    }
    let totals = bank::totals(c).await?;
    assert_eq!(
        totals.values().sum::<i64>(),
        2 * i64::from(HELD) * BALANCE,
        "money created or destroyed: {totals:?}"
    );
    let (mut committed, mut aborted, mut unknown) = (0, 0, 0);
    for (txid, outcome) in done {
        let rows = bank::rows_of(c, txid).await?;
        let (a, b) = (rows[A], rows[B]);
        assert!(
            (a == 1 && b == 1) || (a == 0 && b == 0),
            "transfer {txid} split: {rows:?} (client saw {outcome:?})"
        );
        match outcome {
            TransferOutcome::Committed => {
                committed += 1;
                assert_eq!((a, b), (1, 1), "{txid} committed but {rows:?}");
            }
            TransferOutcome::Aborted(why) => {
                aborted += 1;
                assert_eq!((a, b), (0, 0), "{txid} aborted ({why}) but {rows:?}");
            }
            TransferOutcome::Unknown(_) => unknown += 1,
        }
    }
    eprintln!(
        "{} transfers: {committed} committed, {aborted} aborted, {unknown} unknown to the \
         client; none split; totals {totals:?}",
        done.len()
    );
    Ok(())
}

fn exited_cleanly(status: Option<ExitStatus>) -> bool {
    status.is_some_and(|s| s.code() == Some(0))
}

/// SIGTERM to an agent, and how long it took to exit (`None`: SIGKILLed after `grace`).
async fn sigterm(c: &Cluster, p: &str, grace: Duration) -> Result<(Option<ExitStatus>, Duration)> {
    let proc = c.agent(p)?;
    let sent = Instant::now();
    let status = tokio::task::block_in_place(|| proc.stop_with_grace(grace))?;
    let took = sent.elapsed();
    eprintln!(
        "{p}: SIGTERM -> exit {:?} (signal {:?}) after {took:?}",
        status.and_then(|s| s.code()),
        status.and_then(|s| s.signal())
    );
    Ok((status, took))
}

/// Begins a transaction led by replica `leader` (through that replica alone).
async fn begin_on(c: &Cluster, leader: usize) -> Result<Transaction> {
    let mut replica = c.client.replica(leader).context("no such replica")?;
    let r = replica
        .begin(pb::BeginRequest::default())
        .await?
        .into_inner();
    ensure!(
        r.leader as usize == leader,
        "began on {leader}, led by {}",
        r.leader
    );
    Ok(c.client.transaction(&r.txid, leader))
}

/// A transfer led by each replica, so that every replica has a live stream to each agent.
async fn warm_up(c: &Cluster) -> Result<()> {
    for leader in 0..c.replicas.len() {
        let txn = begin_on(c, leader).await?;
        for (p, delta) in [(A, -1i64), (B, 1)] {
            txn.execute(
                p,
                "UPDATE accounts SET balance = balance + $1 WHERE id = 1",
                &[pb::Value::from(delta)],
            )
            .await?;
        }
        let d = txn.commit().await?;
        ensure!(
            d.outcome == paxos_commit_core::Outcome::Committed,
            "{:?}",
            d.reason
        );
    }
    Ok(())
}

/// The first statement on `p` of a transaction led by each replica in turn, right after the
/// agent came back: each must succeed at once (no retry), well inside the enlistment deadline.
async fn first_executes(c: &Cluster, p: &str, after: &str) -> Result<Vec<Duration>> {
    let mut took = Vec::new();
    for leader in 0..c.replicas.len() {
        let txn = begin_on(c, leader).await?;
        let start = Instant::now();
        let r = txn
            .execute(p, "UPDATE accounts SET balance = balance WHERE id = 2", &[])
            .await;
        let t = start.elapsed();
        eprintln!("{after}: first Execute on {p} led by replica {leader}: {t:?} {r:?}");
        if let Err(e) = r {
            // How long until statements work again, for the failure message.
            let mut tries = 1;
            let recovered = loop {
                tries += 1;
                let retry = begin_on(c, leader).await?;
                let r = retry
                    .execute(p, "UPDATE accounts SET balance = balance WHERE id = 2", &[])
                    .await;
                let _ = retry.abort().await;
                if r.is_ok() || start.elapsed() > Duration::from_secs(30) {
                    break start.elapsed();
                }
            };
            panic!(
                "{after}: the first Execute on {p} (leader {leader}) failed after {t:?}: {e}; \
                 statements worked again after {recovered:?} ({tries} tries)\n{}",
                c.logs_tail(20)
            );
        }
        txn.abort().await?;
        took.push(t);
    }
    Ok(took)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn execute_right_after_an_agent_restart_succeeds() -> Result<()> {
    let c = deployment("agent-restart-enlist").await?;
    warm_up(&c).await?;

    c.agent(A)?.kill9()?;
    c.restart_agent(A).await?;
    let after_kill = first_executes(&c, A, "kill -9 + restart").await?;

    warm_up(&c).await?;
    let (status, _) = sigterm(&c, A, STOP_BOUND).await?;
    c.restart_agent(A).await?;
    let after_term = first_executes(&c, A, "SIGTERM + restart").await?;

    for t in after_kill.iter().chain(&after_term) {
        assert!(
            *t < FIRST_EXECUTE_BOUND,
            "a first Execute took {t:?} (kill -9: {after_kill:?}; SIGTERM: {after_term:?})"
        );
    }
    assert!(
        exited_cleanly(status),
        "the SIGTERMed agent did not exit 0: {status:?}"
    );
    warm_up(&c).await?;
    c.wait_no_prepared(Duration::from_secs(10)).await?;
    Ok(())
}

/// Clients run transfers in a loop; one agent is SIGTERMed while it has branches open and
/// prepared, and one open branch holds a row lock nobody else touches. The agent must exit 0
/// within the bound, the row must be free for a direct UPDATE, and once the agent is started
/// again and its recovery ran, nothing may be left prepared, money is conserved and no
/// transfer is split.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_stops_an_agent_under_load() -> Result<()> {
    let c = deployment("agent-sigterm-load").await?;
    warm_up(&c).await?;

    // An open branch on A (and B) that holds the row lock of HELD.
    let held = c.client.begin().await?;
    for (p, delta) in [(A, -5i64), (B, 5)] {
        held.execute(
            p,
            "UPDATE accounts SET balance = balance + $1 WHERE id = $2",
            &[pb::Value::from(delta), pb::Value::from(i64::from(HELD))],
        )
        .await?;
    }

    let load = Load::start(&c.client, 6);
    tokio::time::sleep(Duration::from_secs(2)).await;

    // Another session waits for the held row while the agent is told to stop.
    let db = c.db(A).await?;
    db.batch_execute("SET lock_timeout = '8s'").await?;
    let waiter = tokio::spawn(async move {
        let start = Instant::now();
        let r = db
            .execute(
                "UPDATE accounts SET balance = balance WHERE id = $1",
                &[&HELD],
            )
            .await;
        (r, start.elapsed())
    });
    tokio::time::sleep(Duration::from_millis(200)).await;
    ensure!(!waiter.is_finished(), "the held row was not locked");

    let (status, took) = sigterm(&c, A, Duration::from_secs(15)).await?;
    let (updated, waited) = waiter.await?;
    eprintln!("direct UPDATE of the held row: {updated:?} after {waited:?}");
    let log = c.agent(A)?.log_tail(400);
    assert!(
        exited_cleanly(status),
        "the agent did not exit 0 after SIGTERM under load: {status:?}\n{log}"
    );
    assert!(took < STOP_BOUND, "the agent took {took:?} to stop\n{log}");
    updated.context("the held row stayed locked after SIGTERM")?;
    let stopped = log
        .lines()
        .rev()
        .find(|l| l.contains("rolled back") && l.contains("left prepared"))
        .with_context(|| format!("the agent did not log what it did on SIGTERM:\n{log}"))?;
    eprintln!("agent log: {stopped}");

    // The load goes on against the agent's absence, then against the agent started again.
    tokio::time::sleep(Duration::from_secs(1)).await;
    c.restart_agent(A).await?;
    tokio::time::sleep(Duration::from_secs(3)).await;
    let done = load.finish().await?;

    // The held transaction lost its branch on A: it cannot commit.
    let d = held.commit().await?;
    eprintln!("held transaction: {:?} ({})", d.outcome, d.reason);
    assert_eq!(d.outcome, paxos_commit_core::Outcome::Aborted);
    assert_eq!(bank::balance(&c, A, HELD).await?, BALANCE);
    assert_eq!(bank::balance(&c, B, HELD).await?, BALANCE);

    assert_no_split(&c, &done).await?;
    let committed_after = done
        .iter()
        .filter(|(_, o)| *o == TransferOutcome::Committed)
        .count();
    ensure!(committed_after > 0, "no transfer committed at all");
    Ok(())
}

/// The drain: a statement already running when SIGTERM comes is let finish (its Execute
/// answers), one that runs past the drain is cancelled so that its row locks go with the
/// process rather than when PostgreSQL next notices, and the agent still exits 0 within the
/// bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_lets_running_statements_finish_and_cancels_what_outlives_the_drain() -> Result<()>
{
    let c = deployment("agent-sigterm-drain").await?;
    let short = c.client.begin().await?;
    let long = c.client.begin().await?;
    long.execute(
        A,
        "UPDATE accounts SET balance = balance - 1 WHERE id = $1",
        &[pb::Value::from(i64::from(HELD))],
    )
    .await?;
    let running = |txn: Transaction, sql: &'static str| {
        tokio::spawn(async move {
            let start = Instant::now();
            let r = txn.execute(A, sql, &[]).await;
            (r, start.elapsed())
        })
    };
    let finishes = running(short, "SELECT pg_catalog.pg_sleep(1.5)::text");
    let outlives = running(long, "SELECT pg_catalog.pg_sleep(60)::text");
    tokio::time::sleep(Duration::from_millis(300)).await;

    let agent = c.agent(A)?;
    let pid = agent.pid().context("the agent is not running")?;
    let sent = Instant::now();
    // SAFETY: kill(2) has no memory-safety preconditions; the pid is our unreaped child.
    ensure!(unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) } == 0);
    // Watched beside the check below, which takes its own time.
    let exited = async {
        while agent.is_running() && sent.elapsed() < Duration::from_secs(15) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        sent.elapsed()
    };
    // While it drains, it takes no new branch, and says why.
    let refuses = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let late = c.client.begin().await?;
        let refused = late
            .execute(A, "UPDATE accounts SET balance = balance WHERE id = 3", &[])
            .await
            .expect_err("a stopping agent must not open a new branch");
        eprintln!("new branch while draining: {refused}");
        assert_eq!(
            refused.code(),
            Some(tonic::Code::Unavailable),
            "{refused:?}"
        );
        assert!(
            refused.to_string().contains("this agent is shutting down"),
            "{refused}"
        );
        late.abort().await?;
        anyhow::Ok(())
    };
    let (took, refused) = tokio::join!(exited, refuses);
    refused?;
    let status = agent.exit_status();
    let log = agent.log_tail(100);
    eprintln!("{A}: SIGTERM -> {status:?} after {took:?}");
    assert!(
        exited_cleanly(status),
        "exit {status:?} after {took:?}\n{log}"
    );
    assert!(took < STOP_BOUND, "the agent took {took:?} to stop\n{log}");
    let (r, t) = finishes.await?;
    eprintln!("statement within the drain: {r:?} after {t:?}");
    r.context("a statement running at SIGTERM was not let finish")?;
    let (r, t) = outlives.await?;
    eprintln!("statement past the drain: {r:?} after {t:?}");
    assert!(r.is_err(), "a 60 s statement cannot have finished");
    assert!(t < STOP_BOUND, "the statement past the drain ran for {t:?}");
    ensure!(
        log.lines()
            .any(|l| l.contains("rolled back 2 open (1 of them after cancelling")),
        "the agent did not report the cancelled statement:\n{log}"
    );
    // Its row is free at once: the cancelled branch was rolled back before the agent exited.
    let db = c.db(A).await?;
    db.batch_execute("SET lock_timeout = '1s'").await?;
    db.execute(
        "UPDATE accounts SET balance = balance WHERE id = $1",
        &[&HELD],
    )
    .await
    .context("the row of the cancelled branch is still locked")?;

    c.restart_agent(A).await?;
    c.wait_no_prepared(Duration::from_secs(10)).await?;
    assert_eq!(bank::balance(&c, A, HELD).await?, BALANCE);
    Ok(())
}
