//! Step 7, the replica's side, end to end with real processes and real PostgreSQL: SIGTERM
//! stops a replica under load (and it stops being an acceptor at once); a second replica on
//! one data directory refuses to start; a flipped byte in the middle of the acceptor log is
//! refused and `--rejoin` brings the replica back; a stalled log device takes the replica out
//! of service while clients commit through the others and no call outlives its deadline; a
//! client-aborted transaction stays aborted across a leader restart; Commit says which
//! participant has not applied the decision.

use anyhow::{bail, Context, Result};
use paxos_commit_integration::bank::{self, TransferOutcome};
use paxos_commit_integration::cluster::{Cluster, Spec};
use paxos_commit_integration::process::{free_port, Proc};
use paxos_commit_proto::client::{lazy_channel, Client, ClientError};
use paxos_commit_proto::pb;
use paxos_commit_proto::pb::acceptor_client::AcceptorClient;
use paxos_commit_proto::tls::{Role, Security};
use paxos_commit_proto::EXIT_REFUSED;
use rand::Rng;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::transport::Channel;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;
use tonic_health::pb::HealthCheckRequest;

const A: &str = "bank_a";
const B: &str = "bank_b";
const ACCOUNTS: i32 = 20;
const BALANCE: i64 = 1_000;

async fn cluster(name: &str, spec: impl FnOnce(Spec) -> Spec) -> Result<Cluster> {
    let mut s = Spec::new(name, 3, &[A, B]);
    s.commit_timeout_ms = 3_000;
    s.branch_timeout_ms = 5_000;
    let c = Cluster::start(spec(s)).await?;
    bank::create_accounts(&c, ACCOUNTS, BALANCE).await?;
    Ok(c)
}

/// What the load saw: every transaction id with the client's outcome, and the calls that
/// failed before a transaction existed (Begin refused everywhere: cleanly retried).
#[derive(Default)]
struct Seen {
    transfers: Vec<(String, TransferOutcome)>,
    not_begun: usize,
    /// The slowest transfer, end to end.
    slowest: Duration,
}

/// `workers` clients moving money between random accounts of A and B until `stop`.
fn load(client: Client, workers: usize, stop: Arc<AtomicBool>) -> tokio::task::JoinHandle<Seen> {
    tokio::spawn(async move {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let mut tasks = Vec::new();
        for _ in 0..workers {
            let (client, stop, seen) = (client.clone(), stop.clone(), seen.clone());
            tasks.push(tokio::spawn(async move {
                while !stop.load(Ordering::Relaxed) {
                    let (from, to) = {
                        let mut rng = rand::rng();
                        (
                            rng.random_range(1..=ACCOUNTS),
                            rng.random_range(1..=ACCOUNTS),
                        )
                    };
                    let started = Instant::now();
                    let result = bank::transfer(&client, (A, from), (B, to), 1).await;
                    let took = started.elapsed();
                    let failed = {
                        let mut s = seen.lock().unwrap_or_else(|p| p.into_inner());
                        s.slowest = s.slowest.max(took);
                        match result {
                            Ok(t) => {
                                s.transfers.push(t);
                                false
                            }
                            Err(_) => {
                                s.not_begun += 1;
                                true
                            }
                        }
                    };
                    if failed {
                        tokio::time::sleep(Duration::from_millis(20)).await;
                    }
                }
            }));
        }
        for t in tasks {
            let _ = t.await;
        }
        Arc::try_unwrap(seen)
            .map(|m| m.into_inner().unwrap_or_else(|p| p.into_inner()))
            .unwrap_or_default()
    })
}

/// Every transfer is all-or-nothing in both databases and agrees with the group's decision;
/// money is conserved; nothing stays prepared; no outcome stays unknown. Returns how many
/// committed.
async fn check_transfers(c: &Cluster, seen: &Seen) -> Result<usize> {
    if let Err(e) = c.wait_no_prepared(Duration::from_secs(30)).await {
        panic!("{e:#}");
    }
    let totals = bank::totals(c).await?;
    assert_eq!(
        totals.values().sum::<i64>(),
        2 * i64::from(ACCOUNTS) * BALANCE,
        "money created or destroyed: {totals:?}"
    );
    let mut committed = 0;
    let mut unknown_at_first = 0;
    for (txid, outcome) in &seen.transfers {
        let rows = bank::rows_of(c, txid).await?;
        let state = if matches!(outcome, TransferOutcome::Unknown(_)) {
            unknown_at_first += 1;
            c.wait_decided(txid, Duration::from_secs(20))
                .await
                .with_context(|| format!("{txid} stayed unknown"))?
        } else {
            match outcome {
                TransferOutcome::Committed => pb::TxnState::Committed,
                _ => pb::TxnState::Aborted,
            }
        };
        match state {
            pb::TxnState::Committed => {
                assert!(rows.values().all(|n| *n == 1), "{txid} split: {rows:?}");
                committed += 1;
            }
            _ => assert!(rows.values().all(|n| *n == 0), "{txid} split: {rows:?}"),
        }
    }
    eprintln!(
        "{} transfers: {committed} committed, {} not begun (retried), {unknown_at_first} unknown \
         to the client at first (all settled since); slowest {:?}",
        seen.transfers.len(),
        seen.not_begun,
        seen.slowest
    );
    Ok(committed)
}

fn log_file(c: &Cluster, replica: usize) -> PathBuf {
    c.dir
        .join(format!("replica-{replica}"))
        .join("acceptor.log")
}

/// SIGTERM, and how long the process took to exit.
fn sigterm(p: &Proc) -> Result<(std::process::ExitStatus, Duration)> {
    let started = Instant::now();
    // The harness would SIGKILL after the grace period: 15 s is beyond what is allowed.
    let status = p
        .stop_with_grace(Duration::from_secs(15))?
        .context("was not running")?;
    Ok((status, started.elapsed()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sigterm_stops_a_replica_under_load_and_it_stops_being_an_acceptor() -> Result<()> {
    let c = cluster("sigterm-replica", |s| s).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let running = load(c.client.clone(), 8, stop.clone());
    tokio::time::sleep(Duration::from_secs(3)).await;

    let (status, took) = sigterm(&c.replicas[1])?;
    let size_at_exit = std::fs::metadata(log_file(&c, 1))?.len();
    eprintln!("replica 1 exited {status} {took:?} after SIGTERM under load");
    assert_eq!(status.code(), Some(0), "{}", c.replicas[1].log_tail(30));
    assert!(took < Duration::from_secs(10), "took {took:?} to stop");
    let log = std::fs::read_to_string(c.replicas[1].log_path())?;
    assert!(log.contains("closing every stream and stopping"), "{log}");

    // The others go on without it, and nothing writes its log any more.
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(std::fs::metadata(log_file(&c, 1))?.len(), size_at_exit);
    stop.store(true, Ordering::Relaxed);
    let seen = running.await?;
    let committed = check_transfers(&c, &seen).await?;
    assert!(committed > 20, "too few commits: {committed}");

    // Back, it serves again.
    c.restart_replica(1).await?;
    commits_on(&c, 1).await
}

/// A transaction led by `replica` (touching A) commits.
async fn commits_on(c: &Cluster, replica: usize) -> Result<()> {
    let txn = begin_on(c, replica).await?;
    txn.execute(A, "UPDATE accounts SET balance = balance WHERE id = 1", &[])
        .await?;
    let d = txn.commit().await?;
    assert_eq!(d.outcome, paxos_commit_core::Outcome::Committed, "{d:?}");
    Ok(())
}

/// Begins a transaction on one replica.
async fn begin_on(c: &Cluster, replica: usize) -> Result<paxos_commit_proto::client::Transaction> {
    let mut r = c.client.replica(replica).context("no such replica")?;
    let begun = r.begin(pb::BeginRequest::default()).await?.into_inner();
    Ok(c.client.transaction(&begun.txid, begun.leader as usize))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_replica_on_one_data_directory_refuses_to_start() -> Result<()> {
    let c = cluster("dir-lock", |s| s).await?;
    let first = &c.replicas[0];
    // Same identity and directory, another port: "kill it and start it again" while it runs.
    let mut args = first.args().to_vec();
    let port = paxos_commit_integration::process::free_port()?;
    args.extend(["--listen".into(), format!("127.0.0.1:{port}")]);
    let size_before = std::fs::metadata(log_file(&c, 0))?.len();
    let second = Proc::spawn(
        "replica-0-again",
        first.binary(),
        &args,
        &[],
        c.dir.join("replica-0-again.log"),
    )?;
    let status = second.wait_exit(Duration::from_secs(20))?;
    let log = std::fs::read_to_string(second.log_path())?;
    assert_eq!(status.code(), Some(i32::from(EXIT_REFUSED)), "{log}");
    assert!(
        log.contains("another process holds the data directory"),
        "{log}"
    );
    assert!(log.contains("coordinator replica 0 of group test"), "{log}");
    assert!(
        log.contains(&format!("pid {}", first.pid().context("first is running")?)),
        "{log}"
    );
    assert_eq!(std::fs::metadata(log_file(&c, 0))?.len(), size_before);
    // The first one was not disturbed.
    let (_, outcome) = bank::transfer(&c.client, (A, 1), (B, 2), 5).await?;
    assert_eq!(outcome, TransferOutcome::Committed);
    Ok(())
}

/// Flips one bit in the middle of the log: inside a batch that has valid batches after it.
fn flip_mid_log(path: &Path) -> Result<u64> {
    let mut bytes = std::fs::read(path)?;
    // The batch headers, by their magic.
    let batches: Vec<usize> = (0..bytes.len().saturating_sub(4))
        .filter(|&i| &bytes[i..i + 4] == b"PXCB")
        .collect();
    if batches.len() < 6 {
        bail!("only {} batches in {}", batches.len(), path.display());
    }
    let victim = batches[batches.len() / 2];
    // Into its payload, past the 12-byte header and the record's length.
    bytes[victim + 20] ^= 0x10;
    std::fs::write(path, &bytes)?;
    Ok(victim as u64)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_damaged_acceptor_log_is_refused_and_rejoin_brings_the_replica_back() -> Result<()> {
    let c = cluster("damaged-log", |s| s).await?;
    for i in 0..15 {
        let (_, outcome) = bank::transfer(&c.client, (A, 1 + i % 5), (B, 1 + i % 7), 1).await?;
        assert_eq!(outcome, TransferOutcome::Committed);
    }
    let (status, _) = sigterm(&c.replicas[2])?;
    assert_eq!(status.code(), Some(0));
    let path = log_file(&c, 2);
    let damaged_at = flip_mid_log(&path)?;
    let damaged = std::fs::read(&path)?;

    // It refuses, names the offset and the way out, and leaves the evidence alone.
    c.replicas[2].restart()?;
    let status = c.replicas[2].wait_exit(Duration::from_secs(20))?;
    let log = c.replicas[2].log_tail(5);
    assert_eq!(status.code(), Some(i32::from(EXIT_REFUSED)), "{log}");
    assert!(
        log.contains(&format!("damaged at byte offset {damaged_at}")),
        "{log}"
    );
    assert!(log.contains("--rejoin"), "{log}");
    assert_eq!(
        std::fs::read(&path)?,
        damaged,
        "the damaged log was modified"
    );

    // Meanwhile the other two carry on.
    let (_, outcome) = bank::transfer(&c.client, (A, 2), (B, 3), 1).await?;
    assert_eq!(outcome, TransferOutcome::Committed);

    // The runbook: start it with --rejoin.
    let (rejoined, info) = rejoin_serving(&c, 2).await?;
    let aside: Vec<_> = std::fs::read_dir(c.dir.join("replica-2"))?
        .filter_map(|e| e.ok())
        .filter(|e| {
            e.file_name()
                .to_string_lossy()
                .starts_with("acceptor.log.damaged-")
        })
        .collect();
    assert_eq!(aside.len(), 1, "the damaged log was not kept");
    assert_eq!(std::fs::read(aside[0].path())?, damaged);
    assert!(info.rejoined, "{info:?}");

    // Transactions led by the rejoined replica, and by the others, commit.
    for leader in [2, 0, 1, 2] {
        let txn = begin_on(&c, leader).await?;
        let txid = txn.id().to_string();
        for (p, delta) in [(A, -1i64), (B, 1)] {
            txn.execute(
                p,
                "UPDATE accounts SET balance = balance + $1 WHERE id = 4",
                &[pb::Value::from(delta)],
            )
            .await?;
            txn.execute(
                p,
                "INSERT INTO transfers (txid, account, delta) VALUES ($1, 4, $2)",
                &[pb::Value::from(txid.as_str()), pb::Value::from(delta)],
            )
            .await?;
        }
        let d = txn.commit().await?;
        assert_eq!(d.outcome, paxos_commit_core::Outcome::Committed, "{d:?}");
    }
    // With the rejoined replica alone beside one other, its own new transactions still
    // commit: it is a full acceptor for them.
    c.replicas[1].stop()?;
    commits_on(&c, 2).await?;
    c.restart_replica(1).await?;

    // A second --rejoin on an intact log is refused: a flag left in a unit file must not
    // throw away a good log at every restart.
    rejoined.stop()?;
    let again = rejoin(&c, 2)?;
    let status = again.wait_exit(Duration::from_secs(20))?;
    assert_eq!(
        status.code(),
        Some(i32::from(EXIT_REFUSED)),
        "{}",
        again.log_tail(5)
    );
    assert!(again.log_tail(5).contains("is intact"));
    let seen = Seen::default();
    check_transfers(&c, &seen).await?;
    Ok(())
}

/// A replica's volume lost and recreated empty (as a new PersistentVolumeClaim would be):
/// started again, the replica does not come back as a new acceptor with amnesia. The peers
/// remember its earlier incarnation and refuse it; `--rejoin` brings it back under a new
/// incarnation, after which nothing sent as the old one is heard.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_lost_acceptor_log_is_refused_and_rejoin_fences_out_the_old_life() -> Result<()> {
    let c = cluster("lost-log", |s| s).await?;
    for i in 0..6 {
        let (_, outcome) = bank::transfer(&c.client, (A, 1 + i % 5), (B, 1 + i % 7), 1).await?;
        assert_eq!(outcome, TransferOutcome::Committed);
    }
    let first_life = info(&c, 2).await?;
    assert_eq!(first_life.state, "serving");
    assert_ne!(first_life.incarnation, 0);

    // kill -9, and the volume comes back empty.
    c.replicas[2].kill9()?;
    let dir = c.dir.join("replica-2");
    for entry in std::fs::read_dir(&dir)? {
        let path = entry?.path();
        if path.is_dir() {
            std::fs::remove_dir_all(&path)?;
        } else {
            std::fs::remove_file(&path)?;
        }
    }
    c.replicas[2].restart()?;
    let status = c.replicas[2].wait_exit(Duration::from_secs(30))?;
    let tail = c.replicas[2].log_tail(5);
    assert_eq!(status.code(), Some(i32::from(EXIT_REFUSED)), "{tail}");
    assert!(
        tail.contains(&format!("as incarnation {}", first_life.incarnation)),
        "{tail}"
    );
    assert!(tail.contains("--rejoin"), "{tail}");

    // The group carries on without it.
    let (_, outcome) = bank::transfer(&c.client, (A, 2), (B, 3), 1).await?;
    assert_eq!(outcome, TransferOutcome::Committed);

    // The runbook: --rejoin (the refused start's own log, never admitted, is set aside too).
    let (_rejoined, second_life) = rejoin_serving(&c, 2).await?;
    assert!(second_life.rejoined, "{second_life:?}");
    assert_ne!(second_life.incarnation, first_life.incarnation);
    commits_on(&c, 2).await?;
    commits_on(&c, 0).await?;

    // Replica 2's first life, were it still running somewhere, is heard by no peer: its
    // streams are refused before they are read. Without an incarnation a replica's
    // messages are refused too, and the current life is heard.
    let txid = {
        let (txid, outcome) = bank::transfer(&c.client, (A, 3), (B, 4), 1).await?;
        assert_eq!(outcome, TransferOutcome::Committed);
        txid
    };
    let phase2b = pb::PaxosBatch {
        messages: vec![pb::PaxosMessage {
            txid: txid.clone(),
            from_replica: 2,
            body: Some(pb::paxos_message::Body::Phase2b(pb::Phase2b {
                participant: A.into(),
                ballot: 0,
                vote: pb::Vote::Prepared as i32,
            })),
            traceparent: String::new(),
        }],
    };
    for peer in [0, 1] {
        let mut as_2 = acceptor_as(&c, peer, Role::Replica(2))?;
        let refused = as_2
            .deliver(named(phase2b.clone(), Some(first_life.incarnation)))
            .await
            .expect_err("the old incarnation was heard");
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused}");
        assert!(
            refused.message().contains("not the one admitted"),
            "{refused}"
        );
        let refused = as_2
            .deliver(named(phase2b.clone(), None))
            .await
            .expect_err("a replica's message without an incarnation was heard");
        assert_eq!(refused.code(), tonic::Code::FailedPrecondition, "{refused}");
        as_2.deliver(named(phase2b.clone(), Some(second_life.incarnation)))
            .await
            .context("the current incarnation")?;
        assert!(info(&c, peer).await?.not_heard >= 1);

        // A join is a replica's own, checked against its certificate.
        let join = |replica: u32, incarnation: u64, mode: pb::JoinMode| pb::JoinRequest {
            incarnation,
            mode: mode.into(),
            replica,
        };
        let status = as_2
            .join(join(1, 99, pb::JoinMode::Rejoin))
            .await
            .expect_err("replica 2 joined as replica 1");
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");
        let mut as_agent = acceptor_as(&c, peer, Role::Agent(A.into()))?;
        let status = as_agent
            .join(join(2, 99, pb::JoinMode::Rejoin))
            .await
            .expect_err("an agent joined as a replica");
        assert_eq!(status.code(), tonic::Code::PermissionDenied, "{status}");
        for (incarnation, mode) in [(0, pb::JoinMode::First), (7, pb::JoinMode::Unspecified)] {
            let status = as_2
                .join(join(2, incarnation, mode))
                .await
                .expect_err("a malformed join");
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status}");
        }
        // Claiming to be new once more is refused, and changes nothing.
        let answer = as_2
            .join(join(2, 4242, pb::JoinMode::First))
            .await?
            .into_inner();
        assert!(!answer.admitted);
        assert_eq!(answer.known_incarnation, second_life.incarnation);
    }
    commits_on(&c, 2).await?;
    let seen = Seen::default();
    check_transfers(&c, &seen).await?;
    Ok(())
}

async fn info(c: &Cluster, i: usize) -> Result<pb::ClusterInfoResponse> {
    let mut ops = c.operator.replica(i).context("no such replica")?;
    Ok(ops.cluster_info(pb::Empty {}).await?.into_inner())
}

/// A message batch as a replica's incarnation `incarnation` sends it.
fn named(batch: pb::PaxosBatch, incarnation: Option<u64>) -> tonic::Request<pb::PaxosBatch> {
    let mut request = tonic::Request::new(batch);
    if let Some(n) = incarnation {
        request
            .metadata_mut()
            .insert(paxos_commit_proto::sender::INCARNATION_HEADER, n.into());
    }
    request
}

fn acceptor_as(c: &Cluster, i: usize, role: Role) -> Result<AcceptorClient<Channel>> {
    let tls = c
        .tls_as(&role)
        .context("the test deployment runs with TLS")?;
    Ok(AcceptorClient::new(lazy_channel(
        &c.replica_addrs[i],
        Some(Duration::from_secs(10)),
        &Security::Tls(tls),
    )?))
}

/// A new group serves only once every replica has started: a new log is admitted when every
/// peer has recorded it, since the one that remembers an earlier life may be the only one
/// that can tell. Until then the replicas that are up say "joining" and refuse Begin.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_new_group_waits_for_every_replica_before_it_serves() -> Result<()> {
    let c = cluster("first-start", |s| s).await?;
    c.wait_no_prepared(Duration::from_secs(10)).await?;
    // Every replica stopped and its directory emptied: the same machines, a new group.
    for (i, replica) in c.replicas.iter().enumerate() {
        let (status, _) = sigterm(replica)?;
        assert_eq!(status.code(), Some(0));
        let dir = c.dir.join(format!("replica-{i}"));
        std::fs::remove_dir_all(&dir)?;
        std::fs::create_dir_all(&dir)?;
    }
    for i in [0, 1] {
        c.replicas[i].restart()?;
        c.wait_replica(i).await?;
    }
    // A majority is up, but replica 2 has not said it never ran: nothing serves.
    tokio::time::sleep(Duration::from_secs(2)).await;
    for i in [0, 1] {
        let now = info(&c, i).await?;
        assert_eq!(now.state, "joining", "replica {i}: {now:?}");
        let refused = c
            .client
            .replica(i)
            .context("no such replica")?
            .begin(pb::BeginRequest::default())
            .await
            .expect_err("a joining replica began a transaction");
        assert_eq!(refused.code(), tonic::Code::Unavailable, "{refused}");
    }
    c.replicas[2].restart()?;
    c.wait_replica(2).await?;
    c.wait_admitted(Duration::from_secs(30)).await?;
    let (_, outcome) = bank::transfer(&c.client, (A, 1), (B, 1), 1).await?;
    assert_eq!(outcome, TransferOutcome::Committed);
    for i in 0..3 {
        let now = info(&c, i).await?;
        assert!(
            !now.rejoined && now.incarnation != 0,
            "replica {i}: {now:?}"
        );
    }
    Ok(())
}

/// Starts replica `i` with `--rejoin` and waits until every peer has admitted its new
/// incarnation and it says "serving".
async fn rejoin_serving(c: &Cluster, i: usize) -> Result<(Proc, pb::ClusterInfoResponse)> {
    let rejoined = rejoin(c, i)?;
    rejoined
        .wait_for_port(c.replica_addrs[i].parse()?, Duration::from_secs(30))
        .await?;
    let by = Instant::now() + Duration::from_secs(30);
    loop {
        let now = info(c, i).await?;
        if now.state == "serving" {
            return Ok((rejoined, now));
        }
        if Instant::now() >= by {
            bail!(
                "replica {i} not serving 30 s after --rejoin ({}):\n{}",
                now.state,
                rejoined.log_tail(20)
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Starts replica `i` again with `--rejoin` (beside the cluster's own handle on it).
fn rejoin(c: &Cluster, i: usize) -> Result<Proc> {
    let mut args = c.replicas[i].args().to_vec();
    args.push("--rejoin".into());
    Proc::spawn(
        &format!("replica-{i}-rejoin"),
        c.replicas[i].binary(),
        &args,
        &[("RUST_LOG".into(), "info".into())],
        c.dir.join(format!("replica-{i}-rejoin.log")),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_stalled_log_device_takes_the_replica_out_of_service() -> Result<()> {
    let stall = tempfile::tempdir()?;
    let stall_file = stall.path().join("stall");
    // The plaintext health listener (what Kubernetes' gRPC probe reads) must tell the same.
    let health_addr = format!("127.0.0.1:{}", free_port()?);
    let agent_health = format!("127.0.0.1:{}", free_port()?);
    let c = cluster("stalled-log", |mut s| {
        s.agent_env.insert(
            A.into(),
            vec![("PAXOS_AGENT_HEALTH_LISTEN".into(), agent_health.clone())],
        );
        s.replica_env.insert(
            0,
            vec![
                (
                    "PAXOS_COMMIT_LOG_STALL_FILE".into(),
                    stall_file.display().to_string(),
                ),
                ("PAXOS_COMMIT_HEALTH_LISTEN".into(), health_addr.clone()),
            ],
        );
        s
    })
    .await?;
    let plaintext = tonic::transport::Endpoint::from_shared(format!("http://{health_addr}"))?
        .connect()
        .await?;
    let mut probe = HealthClient::new(plaintext.clone());
    ensure_status(&mut probe, ServingStatus::Serving).await?;
    let agent_probe = tonic::transport::Endpoint::from_shared(format!("http://{agent_health}"))?
        .connect()
        .await?;
    ensure_status(&mut HealthClient::new(agent_probe), ServingStatus::Serving).await?;
    // Health alone: nothing else answers there, not even to a well-formed call.
    let other = pb::coordinator_client::CoordinatorClient::new(plaintext)
        .begin(pb::BeginRequest::default())
        .await;
    match other {
        Err(s) if s.code() == tonic::Code::Unimplemented => {}
        other => bail!("the health listener answered Begin: {other:?}"),
    }
    let commit_timeout = Duration::from_millis(c.spec.commit_timeout_ms);
    std::fs::write(&stall_file, b"")?;
    let stalled_at = Instant::now();

    // Clients keep committing: through the other replicas once replica 0 is degraded.
    let stop = Arc::new(AtomicBool::new(false));
    let running = load(c.client.clone(), 6, stop.clone());
    let mut ops = c.operator.replica(0).context("replica 0")?;
    let degraded = loop {
        let info = ops.cluster_info(pb::Empty {}).await?.into_inner();
        if info.state == "degraded" {
            break info;
        }
        if stalled_at.elapsed() > Duration::from_secs(15) {
            bail!("replica 0 never reported degraded: {info:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    eprintln!(
        "degraded after {:?}: {}",
        stalled_at.elapsed(),
        degraded.state_reason
    );
    assert!(
        degraded.state_reason.contains("has not returned"),
        "{degraded:?}"
    );
    ensure_status(&mut probe, ServingStatus::NotServing).await?;

    // Begin on it is refused at once, with the reason.
    let started = Instant::now();
    let refused = ops.begin(pb::BeginRequest::default()).await;
    assert!(started.elapsed() < Duration::from_secs(1));
    match refused {
        Err(s) => {
            assert_eq!(s.code(), tonic::Code::PermissionDenied, "{s:?}");
        }
        Ok(r) => bail!("an operator may not begin: {r:?}"),
    }
    let mut as_client = c.client.replica(0).context("replica 0")?;
    let refused = as_client.begin(pb::BeginRequest::default()).await;
    match refused {
        Err(s) => {
            assert_eq!(s.code(), tonic::Code::Unavailable, "{s:?}");
            assert!(s.message().contains("degraded"), "{s:?}");
        }
        Ok(r) => bail!("a degraded replica began a transaction: {r:?}"),
    }
    // GetStatus answers within its bound too.
    let started = Instant::now();
    let _ = as_client
        .get_status(pb::StatusRequest {
            txid: "0000000000000001".into(),
            local_only: true,
        })
        .await;
    assert!(
        started.elapsed() <= commit_timeout + Duration::from_millis(500),
        "GetStatus took {:?}",
        started.elapsed()
    );

    tokio::time::sleep(Duration::from_secs(4)).await;
    std::fs::remove_file(&stall_file)?;
    stop.store(true, Ordering::Relaxed);
    let seen = running.await?;
    // No transfer (Begin, two statements on each side, Commit) outlived its calls' bounds.
    assert!(
        seen.slowest < 2 * commit_timeout + Duration::from_secs(2),
        "a transfer took {:?}",
        seen.slowest
    );
    let committed = check_transfers(&c, &seen).await?;
    assert!(
        committed > 20,
        "clients did not commit through the others: {committed}"
    );

    // The disk is back: so is the replica.
    let back = Instant::now();
    loop {
        let info = ops.cluster_info(pb::Empty {}).await?.into_inner();
        if info.state == "serving" {
            break;
        }
        if back.elapsed() > Duration::from_secs(10) {
            bail!("replica 0 stayed {}: {}", info.state, info.state_reason);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    ensure_status(&mut probe, ServingStatus::Serving).await?;
    commits_on(&c, 0).await
}

/// Waits (at most 5 s) until the health service reports `want` for the whole server.
async fn ensure_status(
    probe: &mut HealthClient<tonic::transport::Channel>,
    want: ServingStatus,
) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let got = probe
            .check(HealthCheckRequest {
                service: String::new(),
            })
            .await?
            .into_inner()
            .status();
        if got == want {
            return Ok(());
        }
        if Instant::now() > deadline {
            bail!("health says {got:?}, not {want:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_aborted_transaction_stays_aborted_across_a_leader_restart() -> Result<()> {
    let c = cluster("abort-remembered", |s| s).await?;
    let mut aborted = Vec::new();
    for leader in 0..3 {
        let txn = begin_on(&c, leader).await?;
        txn.execute(
            A,
            "UPDATE accounts SET balance = balance - 1 WHERE id = 1",
            &[],
        )
        .await?;
        let d = txn.abort().await?;
        assert_eq!(d.outcome, paxos_commit_core::Outcome::Aborted);
        aborted.push((leader, txn.id().to_string()));
    }
    for i in 0..3 {
        c.replicas[i].kill9()?;
        c.restart_replica(i).await?;
    }
    for (leader, txid) in &aborted {
        let s = c.status(txid).await?;
        assert_eq!(
            pb::TxnState::try_from(s.state),
            Ok(pb::TxnState::Aborted),
            "led by {leader}: {s:?}"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn commit_says_which_participant_has_not_applied_it() -> Result<()> {
    let markers = tempfile::tempdir()?;
    let c = cluster("not-applied", |s| {
        s.crash_agent_at(B, "agent-before-finish", &markers.path().join("b"))
    })
    .await?;
    let txn = begin_on(&c, 0).await?;
    let txid = txn.id().to_string();
    for p in [A, B] {
        txn.execute(
            p,
            "INSERT INTO transfers (txid, account, delta) VALUES ($1, 1, 0)",
            &[pb::Value::from(txid.as_str())],
        )
        .await?;
    }
    // B's agent dies before it applies the decision: Commit answers at its timeout, with
    // the decision (it stands) and who has not applied it.
    let started = Instant::now();
    let d = match txn.commit().await {
        Ok(d) => d,
        Err(ClientError::OutcomeUnknown { status, .. }) => bail!("unknown: {status:?}"),
        Err(e) => return Err(e.into()),
    };
    eprintln!("{d:?} after {:?}", started.elapsed());
    assert_eq!(d.outcome, paxos_commit_core::Outcome::Committed);
    assert!(
        started.elapsed() < Duration::from_millis(c.spec.commit_timeout_ms + 1_000),
        "Commit took {:?}",
        started.elapsed()
    );
    assert!(!d.all_applied, "{d:?}");
    assert_eq!(d.not_applied, vec![B.to_string()]);
    assert_eq!(c.prepared(B).await?, vec![c.prepared_gid(B, &txid)]);
    // Once the agent is back, it applies it and Commit says so.
    c.restart_agent(B).await?;
    c.wait_no_prepared(Duration::from_secs(20)).await?;
    let d = txn.commit().await?;
    assert!(d.all_applied && d.not_applied.is_empty(), "{d:?}");
    let rows: BTreeMap<String, i64> = bank::rows_of(&c, &txid).await?;
    assert!(rows.values().all(|n| *n == 1), "{rows:?}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rolling_restart_under_load_loses_nothing() -> Result<()> {
    let c = cluster("rolling-restart", |s| s).await?;
    let stop = Arc::new(AtomicBool::new(false));
    let running = load(c.client.clone(), 6, stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut stops = Vec::new();
    for i in 0..c.replicas.len() {
        let (status, took) = sigterm(&c.replicas[i])?;
        assert_eq!(status.code(), Some(0), "{}", c.replicas[i].log_tail(30));
        stops.push((format!("replica {i}"), took));
        c.restart_replica(i).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    for p in [A, B] {
        let agent = c.agent(p)?;
        let (status, took) = sigterm(agent)?;
        assert_eq!(status.code(), Some(0), "{}", agent.log_tail(30));
        stops.push((format!("agent {p}"), took));
        c.restart_agent(p).await?;
        tokio::time::sleep(Duration::from_secs(2)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let seen = running.await?;
    eprintln!("time to exit after SIGTERM: {stops:?}");
    for (who, took) in &stops {
        assert!(
            *took < Duration::from_secs(10),
            "{who} took {took:?} to stop"
        );
    }
    let committed = check_transfers(&c, &seen).await?;
    assert!(committed > 50, "too few commits: {committed}");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outcomes_are_remembered_past_the_retention_window_and_across_restarts() -> Result<()> {
    let c = cluster("outcomes-archived", |s| {
        s.with_replica_env("PAXOS_COMMIT_RETENTION_MS", "1000")
    })
    .await?;
    let (committed, outcome) = bank::transfer(&c.client, (A, 1), (B, 2), 7).await?;
    assert_eq!(outcome, TransferOutcome::Committed);
    let txn = begin_on(&c, 1).await?;
    txn.execute(
        A,
        "UPDATE accounts SET balance = balance - 1 WHERE id = 3",
        &[],
    )
    .await?;
    txn.abort().await?;
    let aborted = txn.id().to_string();
    let expect = |txid: &str, state: pb::TxnState, s: &pb::StatusResponse| {
        assert_eq!(pb::TxnState::try_from(s.state), Ok(state), "{txid}: {s:?}");
    };
    // Well past the retention window: the replicas' full state for both is gone.
    tokio::time::sleep(Duration::from_secs(4)).await;
    expect(
        &committed,
        pb::TxnState::Committed,
        &c.status(&committed).await?,
    );
    expect(&aborted, pb::TxnState::Aborted, &c.status(&aborted).await?);
    for i in 0..3 {
        c.replicas[i].kill9()?;
        c.restart_replica(i).await?;
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    expect(
        &committed,
        pb::TxnState::Committed,
        &c.status(&committed).await?,
    );
    expect(&aborted, pb::TxnState::Aborted, &c.status(&aborted).await?);
    // A transaction nobody ever began is still unknown.
    let never = c.status("0000000000000042").await?;
    expect("never", pb::TxnState::Unknown, &never);
    Ok(())
}
