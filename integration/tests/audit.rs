//! Step 9 (issue 14), the audit: 10,000 healthy transfers under a replica that audits every
//! few seconds, with nothing reported; then two transfers split by hand, the way an operator
//! at 3 a.m. could split them, and both found, by `txctl audit` and by the replicas' metric:
//!
//! * T1: bank_a dies right after PREPARE, the group aborts, and someone runs
//!   `COMMIT PREPARED` on bank_a by hand (committed here, aborted by the group);
//! * T2: both prepare, the group commits, bank_a applies it, bank_b dies before applying, and
//!   someone runs `ROLLBACK PREPARED` on bank_b by hand (applied there, missing here).

use anyhow::{ensure, Context, Result};
use paxos_commit_integration::bank::{self, TransferOutcome};
use paxos_commit_integration::cluster::{arm_crash_point, disarm_crash_point, Cluster, Spec};
use paxos_commit_integration::process::free_port;
use paxos_commit_integration::scrape::{scrape, value};
use paxos_commit_integration::txctl::Txctl;
use std::time::{Duration, Instant};

const A: &str = "bank_a";
const B: &str = "bank_b";
const TRANSFERS: usize = 10_000;
const WORKERS: usize = 16;

async fn wait_for_metric(
    address: &str,
    name: &str,
    what: impl Fn(f64) -> bool,
    within: Duration,
) -> Result<f64> {
    let deadline = Instant::now() + within;
    loop {
        let v = value(&scrape(address).await?, name);
        if what(v) {
            return Ok(v);
        }
        ensure!(Instant::now() < deadline, "{name} stayed at {v}");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn the_audit_is_silent_on_healthy_transfers_and_finds_a_split_made_by_hand() -> Result<()> {
    let markers = tempfile::tempdir()?;
    let (marker_a, marker_b) = (markers.path().join("a"), markers.path().join("b"));
    disarm_crash_point(&marker_a)?;
    disarm_crash_point(&marker_b)?;
    // Each periodic audit looks back an hour: every transfer of the run, every time.
    let mut spec = Spec::new("audit", 3, &[A, B])
        .crash_agent_at(A, "agent-after-prepare", &marker_a)
        .crash_agent_at(B, "agent-before-finish", &marker_b)
        .with_replica_env("PAXOS_COMMIT_AUDIT_WINDOW_MS", "3600000");
    spec.audit_interval_ms = Some(3_000);
    spec.commit_timeout_ms = 3_000;
    let metrics = format!("127.0.0.1:{}", free_port()?);
    spec.replica_env
        .entry(0)
        .or_default()
        .push(("PAXOS_COMMIT_METRICS_LISTEN".into(), metrics.clone()));
    let c = Cluster::start(spec).await?;
    bank::create_accounts(&c, WORKERS as i32, 1_000_000).await?;
    let txctl = Txctl::new(&c)?;

    // Healthy: each worker moves money between its own pair of accounts, so that nothing
    // waits on another worker's locks.
    let started = Instant::now();
    let workers: Vec<_> = (0..WORKERS)
        .map(|w| {
            let client = c.client.clone();
            tokio::spawn(async move {
                let account = w as i32 + 1;
                let mut committed = 0usize;
                for _ in 0..TRANSFERS / WORKERS {
                    let (_, outcome) = bank::transfer(&client, (A, account), (B, account), 1)
                        .await
                        .context("transfer")?;
                    ensure!(outcome == TransferOutcome::Committed, "{outcome:?}");
                    committed += 1;
                }
                Ok::<_, anyhow::Error>(committed)
            })
        })
        .collect();
    let mut committed = 0;
    for w in workers {
        committed += w.await??;
    }
    let elapsed = started.elapsed();
    eprintln!(
        "{committed} transfers committed in {:.1} s ({:.0}/s) with the periodic audit running",
        elapsed.as_secs_f64(),
        committed as f64 / elapsed.as_secs_f64()
    );
    ensure!(committed == TRANSFERS);

    let (code, report) = txctl.json(&["audit"])?;
    ensure!(code == 0, "a healthy run audits clean: {report}");
    ensure!(report["divergences"].as_array().map(Vec::len) == Some(0));
    ensure!(
        report["transactions"].as_u64() >= Some(TRANSFERS as u64),
        "every transfer was checked: {report}"
    );
    ensure!(report["proofs"].as_u64() >= Some(2 * TRANSFERS as u64));
    // The replica's own audits ran during the transfers (in-flight transactions included)
    // and after them, and none of them cried wolf.
    wait_for_metric(
        &metrics,
        "paxos_commit_audit_transactions",
        |v| v >= TRANSFERS as f64,
        Duration::from_secs(30),
    )
    .await?;
    let samples = scrape(&metrics).await?;
    ensure!(value(&samples, r#"paxos_commit_audit_runs_total{result="clean"}"#) >= 1.0);
    ensure!(
        value(
            &samples,
            r#"paxos_commit_audit_runs_total{result="diverged"}"#
        ) == 0.0,
        "a periodic audit reported a divergence in a healthy run"
    );
    ensure!(value(&samples, "paxos_commit_audit_divergences") == 0.0);

    // T1: bank_a dies right after PREPARE, before it votes; the group aborts.
    arm_crash_point(&marker_a)?;
    let (t1, outcome) = bank::transfer(&c.client, (A, 1), (B, 1), 7).await?;
    eprintln!("T1 {t1}: {outcome:?}");
    ensure!(
        matches!(outcome, TransferOutcome::Aborted(_)),
        "{outcome:?}"
    );
    c.agent(A)?.wait_exit(Duration::from_secs(10))?;
    // ...and an operator commits bank_a's prepared branch by hand.
    c.db(A)
        .await?
        .batch_execute(&format!("COMMIT PREPARED 'pxc:test:{t1}:{A}'"))
        .await?;
    disarm_crash_point(&marker_a)?;
    c.restart_agent(A).await?;

    // T2: the group commits; bank_b dies before applying it...
    arm_crash_point(&marker_b)?;
    let (t2, outcome) = bank::transfer(&c.client, (A, 2), (B, 2), 9).await?;
    eprintln!("T2 {t2}: {outcome:?}");
    ensure!(outcome == TransferOutcome::Committed, "{outcome:?}");
    c.agent(B)?.wait_exit(Duration::from_secs(10))?;
    // ...and an operator rolls bank_b's prepared branch back by hand.
    c.db(B)
        .await?
        .batch_execute(&format!("ROLLBACK PREPARED 'pxc:test:{t2}:{B}'"))
        .await?;
    disarm_crash_point(&marker_b)?;
    c.restart_agent(B).await?;

    let (code, report) = txctl.json(&["audit"])?;
    ensure!(code == 6, "a split exits 6: {report}");
    let mut found: Vec<(String, String, String)> = report["divergences"]
        .as_array()
        .context("divergences")?
        .iter()
        .map(|d| {
            (
                d["txid"].as_str().unwrap_or_default().to_string(),
                d["participant"].as_str().unwrap_or_default().to_string(),
                d["kind"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    found.sort();
    let mut expected = vec![
        (
            t1.clone(),
            A.to_string(),
            "committed-here-aborted-by-group".to_string(),
        ),
        (t2.clone(), B.to_string(), "missing-here".to_string()),
    ];
    expected.sort();
    ensure!(found == expected, "{found:?} != {expected:?}");
    let text = txctl.run(&["audit"])?;
    ensure!(text.code == 6);
    ensure!(text.stdout.contains(&t1) && text.stdout.contains(&t2));
    ensure!(text.stdout.contains("committed here, aborted by the group"));
    ensure!(text
        .stdout
        .contains("committed by the group, rolled back here"));

    // The replica's next audit exports both.
    wait_for_metric(
        &metrics,
        "paxos_commit_audit_divergences",
        |v| v == 2.0,
        Duration::from_secs(20),
    )
    .await?;
    Ok(())
}
