//! Step 3: txctl against a real deployment with something in doubt — the leader killed after
//! deciding and an agent killed, with the automatic recovery slowed down so that the operator
//! sees the in-doubt state — then `resolve --all`, and `heuristic` refusing a contradiction
//! and succeeding only when nothing contradicts.

use anyhow::{Context, Result};
use paxos_commit_integration::bank::{self, TransferOutcome};
use paxos_commit_integration::cluster::{Cluster, Spec};
use paxos_commit_integration::process::binary_path;
use paxos_commit_integration::txctl::Txctl;
use serde_json::Value;
use std::process::Command;
use std::time::Duration;

const A: &str = "bank_a";
const B: &str = "bank_b";

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn operator_finds_and_resolves_in_doubt_transactions() -> Result<()> {
    let markers = tempfile::tempdir()?;
    let mut spec = Spec::new("txctl", 3, &[A, B]).crash_replica_at(
        0,
        "coordinator-after-decision",
        &markers.path().join("r0"),
    );
    // Slow automatic recovery down so that the in-doubt state stays for the operator.
    spec.takeover_after_ms = 120_000;
    spec.in_doubt_after_ms = 120_000;
    spec.commit_timeout_ms = 2_000;
    let c = Cluster::start(spec).await?;
    bank::create_accounts(&c, 2, 100).await?;
    let txctl = Txctl::new(&c)?;

    // T1: both agents prepare and vote, the leader decides Commit and dies before telling.
    // This client knows only the leader, so it cannot settle T1 by asking another replica.
    let leader_only = c.client_of_replica(0)?;
    let (t1, outcome) = bank::transfer(&leader_only, (A, 1), (B, 1), 10).await?;
    c.replicas[0].wait_exit(Duration::from_secs(5))?;
    eprintln!("T1 {t1}: client saw {outcome:?}");
    assert!(
        matches!(outcome, TransferOutcome::Unknown(_)),
        "{outcome:?}"
    );
    // And an agent is lost too.
    c.agent(B)?.kill9()?;

    let (code, v) = txctl.json(&["in-doubt"])?;
    assert_eq!(code, 3, "in-doubt exits 3 when something is in doubt");
    let list = v["in_doubt"].as_array().context("in_doubt array")?;
    assert_eq!(list.len(), 1, "{v}");
    assert_eq!(list[0]["txid"], t1.as_str());
    assert_eq!(list[0]["participant"], A);
    assert_eq!(
        list[0]["group_state"], "committed",
        "the acceptors' votes imply Commit"
    );
    assert_eq!(v["unreachable_agents"].as_array().map(Vec::len), Some(1));
    let (code, _) = txctl.json(&["in-doubt", "--older-than", "10m"])?;
    assert_eq!(
        code, 4,
        "nothing older than 10m, but an agent is unreachable"
    );

    let (code, v) = txctl.json(&["cluster"])?;
    assert_eq!(code, 4);
    assert_eq!(v["replicas"][0]["up"], false);
    assert_eq!(v["replicas"][1]["up"], true);
    assert_eq!(v["replicas"][1]["undecided"], 1);
    let agents = v["agents"].as_array().context("agents")?;
    assert!(agents
        .iter()
        .any(|a| a["participant"] == B && a["up"] == false));
    txctl.run(&["cluster"])?;

    let (code, v) = txctl.json(&["status", &t1])?;
    assert_eq!(code, 0);
    assert_eq!(v["state"], "committed");
    assert_eq!(v["participants"].as_array().map(Vec::len), Some(2));
    txctl.run(&["status", &t1])?;

    // Aborting a branch of a transaction whose votes imply Commit is refused.
    let gid_a = format!("pxc:test:{t1}:{A}");
    let r = txctl.run(&["heuristic", "abort", &gid_a, "--force"])?;
    assert_eq!(r.code, 5, "contradiction must be refused");
    assert!(r.stderr.contains("refused"), "{}", r.stderr);

    // The agent comes back; resolve --all settles everything through the group.
    c.restart_agent(B).await?;
    let (code, v) = txctl.json(&["resolve", "--all"])?;
    assert_eq!(code, 0, "{v}");
    // The restarted agent may have settled T1 through the group just before; whatever was
    // resolved here must be the committed T1.
    for r in v["resolved"].as_array().into_iter().flatten() {
        assert_eq!(
            (&r["txid"], &r["outcome"]),
            (&Value::from(t1.as_str()), &Value::from("committed"))
        );
    }
    let (code, v) = txctl.json(&["in-doubt"])?;
    assert_eq!((code, v["in_doubt"].as_array().map(Vec::len)), (0, Some(0)));
    assert_eq!(bank::balance(&c, A, 1).await?, 90);
    assert_eq!(bank::balance(&c, B, 1).await?, 110);
    // Idempotent.
    assert_eq!(txctl.run(&["resolve", &t1])?.code, 0);

    // An orphan branch no replica ever heard of (as if the whole group had been lost):
    // committing it alone is refused, aborting needs --force, then succeeds.
    let orphan = "00ffeeddccbbaa99";
    let gid = format!("pxc:test:{orphan}:{A}");
    c.db(A)
        .await?
        .batch_execute(&format!(
            "BEGIN; UPDATE accounts SET balance = balance - 1 WHERE id = 2; PREPARE TRANSACTION '{gid}'"
        ))
        .await?;
    let (code, v) = txctl.json(&["in-doubt"])?;
    assert_eq!(code, 3);
    assert_eq!(v["in_doubt"][0]["group_state"], "unknown");
    assert_eq!(
        txctl.run(&["heuristic", "commit", &gid, "--force"])?.code,
        5
    );
    let r = txctl.run(&["heuristic", "abort", &gid])?;
    assert_eq!(r.code, 5, "needs --force");
    assert!(r.stderr.contains("--force"));
    let (code, v) = txctl.json(&["heuristic", "abort", &gid, "--force"])?;
    assert_eq!(code, 0, "{v}");
    assert_eq!(v["applied"], true);
    assert!(c.prepared(A).await?.is_empty());
    assert_eq!(bank::balance(&c, A, 2).await?, 100);
    Ok(())
}

#[test]
fn help_explains_every_command() -> Result<()> {
    let out = Command::new(binary_path("txctl")?).arg("--help").output()?;
    let help = String::from_utf8_lossy(&out.stdout);
    for cmd in [
        "status",
        "in-doubt",
        "resolve",
        "cluster",
        "heuristic",
        "Exit codes",
    ] {
        assert!(help.contains(cmd), "--help lacks {cmd}:\n{help}");
    }
    for cmd in ["status", "in-doubt", "resolve", "cluster", "heuristic"] {
        let out = Command::new(binary_path("txctl")?)
            .args([cmd, "--help"])
            .output()?;
        let help = String::from_utf8_lossy(&out.stdout);
        assert!(
            help.contains("Example: txctl"),
            "{cmd} --help lacks an example:\n{help}"
        );
    }
    Ok(())
}
