//! Step 9 (issue 14), what an operator's tools see: gRPC reflection on every server, so that
//! grpcurl (or any reflection client) lists the services and fetches their descriptors; and
//! Prometheus metrics that follow a transaction into doubt (an agent killed after PREPARE)
//! and out of it.

use anyhow::{ensure, Context, Result};
use paxos_commit_integration::bank::{self, TransferOutcome};
use paxos_commit_integration::cluster::{Cluster, Spec};
use paxos_commit_integration::process::free_port;
use paxos_commit_integration::scrape::{scrape, value};
use paxos_commit_proto::client::lazy_channel;
use paxos_commit_proto::tls::{Role, Security};
use std::collections::BTreeSet;
use std::time::Duration;
use tokio::time::Instant;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

const A: &str = "bank_a";
const B: &str = "bank_b";

/// Asks one server, as `role`, for its services and for the file that defines `symbol`.
async fn reflect(
    c: &Cluster,
    address: &str,
    role: &Role,
    symbol: &str,
) -> Result<BTreeSet<String>> {
    let tls = c.tls_as(role).context("the test cluster has TLS")?;
    let channel = lazy_channel(address, Some(Duration::from_secs(10)), &Security::Tls(tls))?;
    let mut client = ServerReflectionClient::new(channel);
    let requests = [
        MessageRequest::ListServices(String::new()),
        MessageRequest::FileContainingSymbol(symbol.to_string()),
    ]
    .into_iter()
    .map(|m| ServerReflectionRequest {
        host: String::new(),
        message_request: Some(m),
    });
    let mut answers = client
        .server_reflection_info(futures::stream::iter(requests))
        .await?
        .into_inner();
    let mut services = BTreeSet::new();
    let mut files = 0;
    while let Some(answer) = answers.message().await? {
        match answer.message_response.context("an empty answer")? {
            MessageResponse::ListServicesResponse(list) => {
                services.extend(list.service.into_iter().map(|s| s.name));
            }
            MessageResponse::FileDescriptorResponse(f) => files += f.file_descriptor_proto.len(),
            MessageResponse::ErrorResponse(e) => anyhow::bail!("reflection error: {e:?}"),
            other => anyhow::bail!("unexpected answer {other:?}"),
        }
    }
    ensure!(files > 0, "no descriptor for {symbol}");
    Ok(services)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_server_answers_grpc_reflection() -> Result<()> {
    let c = Cluster::start(Spec::new("reflection", 1, &[A])).await?;
    let operator = Role::Operator("ops".into());
    let replica = reflect(
        &c,
        &c.replica_addrs[0],
        &operator,
        "paxoscommit.v1.Coordinator",
    )
    .await?;
    for s in [
        "paxoscommit.v1.Coordinator",
        "paxoscommit.v1.Acceptor",
        "grpc.health.v1.Health",
        "grpc.reflection.v1.ServerReflection",
    ] {
        ensure!(
            replica.contains(s),
            "the replica does not list {s}: {replica:?}"
        );
    }
    let agent = reflect(&c, &c.agent_addrs[A], &operator, "paxoscommit.v1.Agent").await?;
    ensure!(
        agent.contains("paxoscommit.v1.Agent"),
        "the agent does not list its service: {agent:?}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_follow_a_transaction_into_doubt_and_out() -> Result<()> {
    let markers = tempfile::tempdir()?;
    // bank_b dies right after PREPARE, before its vote leaves: the transfer is in doubt until
    // the leader, after takeover_after_ms, chooses Aborted for bank_b's instance.
    let mut spec = Spec::new("metrics", 1, &[A, B]).crash_agent_at(
        B,
        "agent-after-prepare",
        &markers.path().join("b"),
    );
    spec.takeover_after_ms = 5_000;
    // Nor may bank_a ask about its prepared branch before then.
    spec.in_doubt_after_ms = 6_000;
    let replica = format!("127.0.0.1:{}", free_port()?);
    let agent_a = format!("127.0.0.1:{}", free_port()?);
    spec.replica_env
        .entry(0)
        .or_default()
        .push(("PAXOS_COMMIT_METRICS_LISTEN".into(), replica.clone()));
    spec.agent_env
        .entry(A.to_string())
        .or_default()
        .push(("PAXOS_AGENT_METRICS_LISTEN".into(), agent_a.clone()));
    let c = Cluster::start(spec).await?;
    bank::create_accounts(&c, 4, 100).await?;

    // The crash point fires once: the first transfer with bank_b in it dies there.
    let committed = r#"paxos_commit_transactions_total{outcome="committed"}"#;
    let aborted = r#"paxos_commit_transactions_total{outcome="aborted"}"#;
    let undecided = "paxos_commit_transactions_undecided";
    let prepared_a = "paxos_commit_agent_prepared_branches";
    let before = scrape(&replica).await?;
    let client = c.client.clone();
    let transfer = tokio::spawn(async move { bank::transfer(&client, (A, 1), (B, 1), 10).await });
    let (mut max_undecided, mut max_prepared_a, mut max_oldest) = (0.0f64, 0.0f64, 0.0f64);
    let deadline = Instant::now() + Duration::from_secs(20);
    while !transfer.is_finished() {
        ensure!(Instant::now() < deadline, "the transfer never finished");
        let r = scrape(&replica).await?;
        let a = scrape(&agent_a).await?;
        max_undecided = max_undecided.max(value(&r, undecided));
        max_oldest = max_oldest.max(value(&r, "paxos_commit_oldest_undecided_seconds"));
        max_prepared_a = max_prepared_a.max(value(&a, prepared_a));
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    let (txid, outcome) = transfer.await??;
    eprintln!(
        "{txid}: {outcome:?}; in doubt: undecided up to {max_undecided}, oldest {max_oldest} s, \
         bank_a prepared up to {max_prepared_a}"
    );
    ensure!(
        matches!(outcome, TransferOutcome::Aborted(_)),
        "{outcome:?}"
    );
    ensure!(max_undecided >= 1.0, "the in-doubt gauge never rose");
    ensure!(max_oldest > 0.0, "the oldest in-doubt age never rose");
    ensure!(
        max_prepared_a >= 1.0,
        "bank_a's prepared-branch gauge never rose"
    );

    // Resolved: the gauges fall back, the counters moved.
    c.restart_agent(B).await?;
    c.wait_no_prepared(Duration::from_secs(15)).await?;
    let settled = Instant::now() + Duration::from_secs(10);
    loop {
        let r = scrape(&replica).await?;
        let a = scrape(&agent_a).await?;
        if value(&r, undecided) == 0.0 && value(&a, prepared_a) == 0.0 {
            ensure!(
                value(&r, aborted) >= value(&before, aborted) + 1.0,
                "the aborted counter did not move"
            );
            ensure!(
                value(&r, "paxos_commit_takeovers_total") >= 1.0,
                "no takeover counted"
            );
            ensure!(
                value(&r, "paxos_commit_log_fsync_seconds_count") >= 1.0,
                "no fsync timed"
            );
            ensure!(
                value(
                    &a,
                    r#"paxos_commit_agent_decisions_applied_total{outcome="aborted"}"#
                ) >= 1.0,
                "bank_a applied no abort"
            );
            break;
        }
        ensure!(
            Instant::now() < settled,
            "the gauges did not fall back: {r:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    // And a transfer that commits is counted and timed.
    let (_, outcome) = bank::transfer(&c.client, (A, 2), (B, 2), 10).await?;
    ensure!(outcome == TransferOutcome::Committed, "{outcome:?}");
    let r = scrape(&replica).await?;
    ensure!(value(&r, committed) >= value(&before, committed) + 1.0);
    ensure!(
        value(
            &r,
            r#"paxos_commit_commit_seconds_count{outcome="committed"}"#
        ) >= 1.0
    );
    // Every phase is timed, at the replica and at the agent (whose apply ends with its
    // acknowledgement, a moment after the client may have its answer).
    for phase in ["decide", "apply", "accept"] {
        let name = format!("paxos_commit_phase_seconds_count{{phase=\"{phase}\"}}");
        ensure!(value(&r, &name) >= 1.0, "the replica did not time {phase}");
    }
    let timed = Instant::now() + Duration::from_secs(5);
    for phase in ["execute", "prepare", "apply"] {
        let name = format!("paxos_commit_agent_phase_seconds_count{{phase=\"{phase}\"}}");
        while value(&scrape(&agent_a).await?, &name) < 1.0 {
            ensure!(Instant::now() < timed, "bank_a did not time {phase}");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    Ok(())
}

/// The Grafana dashboard and the alert rules in docs/monitoring name only metrics the servers
/// export (a renamed metric would leave a panel empty and an alert silent).
#[test]
fn the_dashboard_and_alerts_use_only_exported_metrics() -> Result<()> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .context("workspace root")?
        .to_path_buf();
    let mut sources = String::new();
    for dir in ["coordinator/src", "participant-agent/src"] {
        for entry in std::fs::read_dir(root.join(dir))? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "rs") {
                sources.push_str(&std::fs::read_to_string(&path)?);
            }
        }
    }
    let dashboard = std::fs::read_to_string(root.join("docs/monitoring/grafana-dashboard.json"))?;
    let parsed: serde_json::Value = serde_json::from_str(&dashboard)?;
    ensure!(
        parsed["panels"].as_array().is_some_and(|p| !p.is_empty()),
        "a dashboard without panels"
    );
    let alerts = std::fs::read_to_string(root.join("docs/monitoring/alerts.yml"))?;
    let mut checked = 0;
    for text in [&dashboard, &alerts] {
        for (at, _) in text.match_indices("paxos_commit_") {
            let name: String = text[at..]
                .chars()
                .take_while(|c| c.is_ascii_lowercase() || *c == '_')
                .collect();
            let base = ["_bucket", "_count", "_sum"]
                .iter()
                .find_map(|s| name.strip_suffix(s))
                .unwrap_or(&name);
            ensure!(
                sources.contains(&format!("\"{base}\"")),
                "{base} is in docs/monitoring but no server exports it"
            );
            checked += 1;
        }
    }
    ensure!(checked > 10, "only {checked} metric names found");
    Ok(())
}
