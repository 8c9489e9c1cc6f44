//! Step 9 (issue 14), what an operator's tools see: gRPC reflection on every server, so that
//! grpcurl (or any reflection client) lists the services and fetches their descriptors.

use anyhow::{ensure, Context, Result};
use paxos_commit_integration::cluster::{Cluster, Spec};
use paxos_commit_proto::client::lazy_channel;
use paxos_commit_proto::tls::{Role, Security};
use std::collections::BTreeSet;
use std::time::Duration;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;
use tonic_reflection::pb::v1::ServerReflectionRequest;

const A: &str = "bank_a";

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
