//! Step 9 (observability), distributed tracing end to end: one transfer across two databases
//! with F = 1 makes ONE trace, with spans from the client, the leader, the acceptors and both
//! agents, exported over OTLP to a receiver this test runs itself; and an agent's last spans
//! reach the collector when it stops gracefully.

use anyhow::{ensure, Context, Result};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use opentelemetry_proto::tonic::common::v1::KeyValue;
use paxos_commit_integration::bank::{self, TransferOutcome};
use paxos_commit_integration::cluster::{Cluster, Spec};
use paxos_commit_integration::process::free_port;
use paxos_commit_proto::phase_span;
use paxos_commit_proto::telemetry::{init_telemetry_with, TraceParent};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::time::Instant;
use tracing::Instrument;

const A: &str = "bank_a";
const B: &str = "bank_b";
const CLIENT: &str = "paxos-commit-test-client";

/// One exported span, as much of it as the assertions need.
#[derive(Debug, Clone)]
struct Seen {
    service: String,
    name: String,
    trace_id: String,
    txid: Option<String>,
}

/// A minimal OTLP/gRPC trace collector: keeps every span it is sent.
#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Seen>>>,
}

fn string_attr(attrs: &[KeyValue], key: &str) -> Option<String> {
    attrs.iter().find(|kv| kv.key == key).and_then(|kv| {
        match kv.value.as_ref()?.value.as_ref()? {
            AnyValue::StringValue(s) => Some(s.clone()),
            _ => None,
        }
    })
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        let mut seen = Vec::new();
        for rs in req.into_inner().resource_spans {
            let service = rs
                .resource
                .as_ref()
                .and_then(|r| string_attr(&r.attributes, "service.name"))
                .unwrap_or_default();
            for ss in rs.scope_spans {
                for span in ss.spans {
                    seen.push(Seen {
                        service: service.clone(),
                        name: span.name.clone(),
                        trace_id: hex(&span.trace_id),
                        txid: string_attr(&span.attributes, "txid"),
                    });
                }
            }
        }
        self.spans
            .lock()
            .map_err(|_| tonic::Status::internal("poisoned"))?
            .extend(seen);
        Ok(tonic::Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Collector {
    /// Starts the collector on a free local port; returns its endpoint URL.
    async fn start(&self) -> Result<String> {
        let port = free_port()?;
        let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse()?;
        let service = TraceServiceServer::new(self.clone());
        tokio::spawn(async move {
            if let Err(e) = tonic::transport::Server::builder()
                .add_service(service)
                .serve(addr)
                .await
            {
                eprintln!("[test] the OTLP collector failed: {e}");
            }
        });
        paxos_commit_integration::process::wait_for_port(addr, Duration::from_secs(10)).await?;
        Ok(format!("http://{addr}"))
    }

    /// Span names by service, of the spans of one trace.
    fn trace(&self, trace_id: &str) -> BTreeMap<String, BTreeSet<String>> {
        let spans = self.spans.lock().map(|s| s.clone()).unwrap_or_default();
        let mut by_service: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
        for s in spans.into_iter().filter(|s| s.trace_id == trace_id) {
            by_service.entry(s.service).or_default().insert(s.name);
        }
        by_service
    }

    /// The txids the spans of one trace name.
    fn txids(&self, trace_id: &str) -> BTreeSet<String> {
        let spans = self.spans.lock().map(|s| s.clone()).unwrap_or_default();
        spans
            .into_iter()
            .filter(|s| s.trace_id == trace_id)
            .filter_map(|s| s.txid)
            .collect()
    }

    /// Waits (at most `timeout`) until `done` holds of the trace's spans; returns them.
    async fn wait_for(
        &self,
        trace_id: &str,
        timeout: Duration,
        done: impl Fn(&BTreeMap<String, BTreeSet<String>>) -> bool,
    ) -> BTreeMap<String, BTreeSet<String>> {
        let deadline = Instant::now() + timeout;
        loop {
            let trace = self.trace(trace_id);
            if done(&trace) || Instant::now() >= deadline {
                return trace;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

fn has(trace: &BTreeMap<String, BTreeSet<String>>, service: &str, names: &[&str]) -> bool {
    trace
        .get(service)
        .is_some_and(|got| names.iter().all(|n| got.contains(*n)))
}

/// Replicas (by service name) whose acceptor accepted a vote of this trace.
fn acceptors(trace: &BTreeMap<String, BTreeSet<String>>, replicas: usize) -> Vec<String> {
    (0..replicas)
        .map(|i| format!("paxos-commit-coordinator-{i}"))
        .filter(|s| has(trace, s, &["accept"]))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_transfer_is_one_trace_across_client_replicas_and_agents() -> Result<()> {
    let collector = Collector::default();
    let endpoint = collector.start().await?;
    // The test is the client: its spans (and the client library's) go to the same collector.
    let telemetry = init_telemetry_with(CLIENT, Some(endpoint.clone()));

    // Agent B exports only when it stops (its batch delay is ten minutes): what reaches the
    // collector from it comes from the flush at its graceful shutdown.
    let spec = Spec::new("tracing", 3, &[A, B])
        .with_env("OTEL_EXPORTER_OTLP_ENDPOINT", &endpoint)
        .with_env("OTEL_BSP_SCHEDULE_DELAY", "100")
        .with_agent_env(B, "OTEL_BSP_SCHEDULE_DELAY", "600000");
    let c = Cluster::start(spec).await?;
    bank::create_accounts(&c, 2, 100).await?;

    let root = phase_span!("transfer", txid = tracing::field::Empty);
    let trace_id = TraceParent::of(&root)
        .context("the test's root span has no trace context: is the OTLP layer installed?")?
        .as_str()[3..35]
        .to_string();
    let (txid, outcome) = bank::transfer(&c.client, (A, 1), (B, 2), 30)
        .instrument(root.clone())
        .await?;
    root.record("txid", txid.as_str());
    drop(root);
    ensure!(outcome == TransferOutcome::Committed, "{outcome:?}");
    let leader = format!(
        "paxos-commit-coordinator-{}",
        txid.get(..2)
            .and_then(|h| u8::from_str_radix(h, 16).ok())
            .context("txid names its leader")?
    );
    let agent_a = format!("paxos-commit-agent-{A}");
    let agent_b = format!("paxos-commit-agent-{B}");
    // The client's own spans leave with a flush of its exporter (which blocks this thread).
    tokio::task::block_in_place(|| telemetry.shutdown());

    let live = |t: &BTreeMap<String, BTreeSet<String>>| {
        has(t, CLIENT, &["transfer", "begin", "execute", "commit"])
            && has(t, &leader, &["begin", "commit", "decide"])
            && acceptors(t, 3).len() == 3
            && has(t, &agent_a, &["execute", "prepare", "apply"])
    };
    let trace = collector
        .wait_for(&trace_id, Duration::from_secs(20), live)
        .await;
    ensure!(
        has(&trace, CLIENT, &["transfer", "begin", "execute", "commit"]),
        "the client's spans are missing from trace {trace_id}: {trace:#?}"
    );
    ensure!(
        has(&trace, &leader, &["begin", "commit", "decide"]),
        "the leader's spans are missing from trace {trace_id}: {trace:#?}"
    );
    let accepted = acceptors(&trace, 3);
    ensure!(
        accepted.len() >= 2,
        "fewer than a majority of acceptors have accept spans in trace {trace_id}: \
         {accepted:?}; {trace:#?}"
    );
    ensure!(
        has(&trace, &agent_a, &["execute", "prepare", "apply"]),
        "agent {A}'s spans are missing from trace {trace_id}: {trace:#?}"
    );

    // Agent B's spans are still queued in it; a graceful stop sends them.
    let b = c.agent(B)?;
    let status = tokio::task::block_in_place(|| b.stop())?;
    ensure!(
        status.is_some_and(|s| s.success()),
        "agent {B} did not stop cleanly: {status:?}"
    );
    let trace = collector
        .wait_for(&trace_id, Duration::from_secs(10), |t| {
            has(t, &agent_b, &["execute", "prepare", "apply"])
        })
        .await;
    ensure!(
        has(&trace, &agent_b, &["execute", "prepare", "apply"]),
        "agent {B}'s spans did not arrive when it stopped: {trace:#?}"
    );
    let txids = collector.txids(&trace_id);
    ensure!(
        txids == BTreeSet::from([txid.clone()]),
        "the spans of trace {trace_id} name other transactions than {txid}: {txids:?}"
    );
    eprintln!("[test] trace {trace_id} of {txid}: {trace:?}");
    Ok(())
}
