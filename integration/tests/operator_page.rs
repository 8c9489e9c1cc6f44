//! Step 9 (issue 14), the operator page in a real browser: headless Chromium loads replica
//! 0's page while a transfer is in doubt (bank_b died right after PREPARE, before voting, and
//! the takeover is far off), and what it rendered must show the replicas, the agents (bank_b
//! down), the in-doubt transfer with bank_a's Prepared vote as every acceptor recorded it, the
//! last minutes' commits and the audit; the lookup form, filled in and submitted, shows the
//! transaction. The page is refused, with nothing of its data, to a browser without a
//! certificate and to one with a client's certificate. The screenshot goes to
//! `target/operator-page.png` (and to `docs/operator-page.png` with
//! `PAXOS_COMMIT_UPDATE_SCREENSHOT=1`).

use anyhow::{ensure, Context, Result};
use paxos_commit_integration::bank::{self, TransferOutcome};
use paxos_commit_integration::browser;
use paxos_commit_integration::cluster::{arm_crash_point, disarm_crash_point, Cluster, Spec};
use paxos_commit_integration::process::workspace_root;
use paxos_commit_proto::tls::Role;
use serde_json::Value;
use std::time::Duration;

const A: &str = "bank_a";
const B: &str = "bank_b";

fn text(v: &Value, key: &str) -> String {
    v[key].as_str().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_operator_sees_an_in_doubt_transfer_in_a_real_browser() -> Result<()> {
    let chromium = browser::chromium()?;
    let markers = tempfile::tempdir()?;
    let marker = markers.path().join("b");
    disarm_crash_point(&marker)?;
    let mut spec =
        Spec::new("operator-page", 3, &[A, B]).crash_agent_at(B, "agent-after-prepare", &marker);
    // The in-doubt state must outlast the browser's visit.
    spec.takeover_after_ms = 120_000;
    spec.in_doubt_after_ms = 120_000;
    spec.commit_timeout_ms = 2_000;
    spec.operator_page = true;
    spec.audit_interval_ms = Some(2_000);
    let c = Cluster::start(spec).await?;
    bank::create_accounts(&c, 4, 1_000).await?;

    // Led by replica 0, whose page is visited: a few commits for "last minutes".
    let leader_only = c.client_of_replica(0)?;
    for i in 0..20 {
        let (_, outcome) = bank::transfer(&leader_only, (A, 2), (B, 2), i).await?;
        ensure!(outcome == TransferOutcome::Committed, "{outcome:?}");
    }
    // This transfer's bank_b branch dies after PREPARE, before it votes.
    arm_crash_point(&marker)?;
    let (txid, outcome) = bank::transfer(&leader_only, (A, 1), (B, 1), 10).await?;
    eprintln!("in doubt: {txid} ({outcome:?})");
    ensure!(
        matches!(outcome, TransferOutcome::Unknown(_)),
        "{outcome:?}"
    );
    c.agent(B)?.wait_exit(Duration::from_secs(10))?;
    // Let the replica's audit run once with bank_b gone.
    tokio::time::sleep(Duration::from_secs(3)).await;

    let operator = c
        .tls_files(&Role::Operator("test".into()))?
        .context("the page needs TLS")?;
    let client = c
        .tls_files(&Role::Client("test".into()))?
        .context("the page needs TLS")?;
    let screenshot = workspace_root().join("target").join("operator-page.png");
    let path = |p: &std::path::Path| p.display().to_string();
    let args = vec![
        format!("https://{}/", c.operator_pages[0]),
        path(&chromium),
        path(&operator.cert),
        path(&operator.key),
        path(&client.cert),
        path(&client.key),
        path(&screenshot),
        txid.clone(),
    ];
    let printed = tokio::task::block_in_place(|| browser::run("operator_page.py", &args))?;
    let seen: Value = serde_json::from_str(printed.trim())
        .with_context(|| format!("the browser script printed no JSON: {printed}"))?;
    let page = text(&seen, "text");
    eprintln!("--- the page as Chromium rendered it:\n{page}\n---");

    ensure!(seen["status"] == 200, "{seen}");
    ensure!(text(&seen, "title").contains("paxos-commit"));
    ensure!(page.contains("signed in as operator test"), "{page}");
    ensure!(seen["scripts"] == 0, "the page runs no scripts");
    let headings: Vec<String> = serde_json::from_value(seen["headings"].clone())?;
    for h in [
        "Replicas",
        "Agents",
        "In doubt",
        "Look up a transaction",
        "Last minutes",
        "Audit",
    ] {
        ensure!(
            headings.iter().any(|x| x == h),
            "no {h} section: {headings:?}"
        );
    }
    // The in-doubt transfer: prepared on bank_a, its vote at every acceptor, bank_b silent.
    let links: Vec<String> = serde_json::from_value(seen["in_doubt_links"].clone())?;
    ensure!(
        links.contains(&txid),
        "{txid} not listed in doubt: {links:?}"
    );
    ensure!(
        page.contains("1 prepared branch(es) wait for a decision"),
        "{page}"
    );
    for r in 0..3 {
        ensure!(
            page.contains(&format!("prepared at r{r} (ballot 0)")),
            "bank_a's vote at r{r} not shown"
        );
    }
    ensure!(page.contains("bank_b: no vote recorded"), "{page}");
    ensure!(page.contains("in progress"));
    // Health: three replicas serving, bank_b down.
    ensure!(page.matches("serving").count() >= 3, "{page}");
    ensure!(page.contains("down"), "bank_b is down: {page}");
    // The last minutes hold the 20 commits; the audit ran (incomplete: bank_b is down).
    ensure!(page.contains("committed/s"), "{page}");
    ensure!(
        page.contains("incomplete") || page.contains("clean"),
        "no audit result: {page}"
    );
    ensure!(page.contains("agent bank_b could not be read"), "{page}");

    // The lookup form, submitted in the browser.
    ensure!(
        text(&seen, "lookup_url").ends_with(&format!("/?txid={txid}")),
        "{seen}"
    );
    let lookup = text(&seen, "lookup_text");
    ensure!(
        lookup.contains(&format!("{txid}: in progress · led by r0")),
        "{lookup}"
    );

    // Hostile requests get clear codes; what the page echoes is escaped.
    let hostile = &seen["hostile"];
    for (name, status) in [("post", 405), ("long_query", 400), ("other_path", 404)] {
        ensure!(
            hostile[name]["status"] == status,
            "{name}: {}",
            hostile[name]
        );
    }
    let markup = text(&hostile["markup"], "body");
    ensure!(hostile["markup"]["status"] == 200, "{}", hostile["markup"]);
    ensure!(
        markup.contains("&lt;script&gt;") && !markup.contains("<script>"),
        "the looked-up text was not escaped"
    );

    // Refused: no certificate, or a client's.
    ensure!(seen["anonymous"]["status"] == 401, "{seen}");
    ensure!(text(&seen["anonymous"], "text").contains("no client certificate"));
    ensure!(seen["client"]["status"] == 403, "{seen}");
    ensure!(text(&seen["client"], "text").contains("for operators"));
    for who in ["anonymous", "client"] {
        ensure!(
            !text(&seen[who], "text").contains(&txid),
            "the {who} page leaked the transaction"
        );
    }

    ensure!(
        std::fs::metadata(&screenshot)?.len() > 10_000,
        "no screenshot"
    );
    if std::env::var_os("PAXOS_COMMIT_UPDATE_SCREENSHOT").is_some() {
        std::fs::copy(&screenshot, workspace_root().join("docs/operator-page.png"))?;
    }
    Ok(())
}
