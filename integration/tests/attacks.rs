//! Step 6: nobody can split a transfer. Each attack that once split one (an attacker's
//! report against the plaintext deployment) is tried again here against a deployment with
//! mutual TLS, and must now fail to make one database commit what another aborts: balances,
//! the transfer rows and `pg_prepared_xacts` are checked after each. Plus the identity
//! checks themselves: anonymous callers, callers with the wrong role, a replica that claims
//! to be another, expired and foreign certificates.

use anyhow::{ensure, Context, Result};
use paxos_commit_integration::bank::{self, TransferOutcome};
use paxos_commit_integration::cluster::{Cluster, Spec};
use paxos_commit_proto::client::{lazy_channel, Client, ClientConfig};
use paxos_commit_proto::pb;
use paxos_commit_proto::pb::acceptor_client::AcceptorClient;
use paxos_commit_proto::pb::agent_client::AgentClient;
use paxos_commit_proto::pb::coordinator_client::CoordinatorClient;
use paxos_commit_proto::pki::{Ca, Validity};
use paxos_commit_proto::tls::{Role, Security, Tls};
use std::sync::Arc;
use std::time::Duration;
use tonic::transport::Channel;
use tonic::Code;

const A: &str = "bank_a";
const B: &str = "bank_b";
const ACCOUNTS: i32 = 4;
const BALANCE: i64 = 100;

async fn deployment(mut spec: Spec) -> Result<Cluster> {
    spec.commit_timeout_ms = 4_000;
    let c = Cluster::start(spec).await?;
    bank::create_accounts(&c, ACCOUNTS, BALANCE).await?;
    Ok(c)
}

fn tls(c: &Cluster, role: Role) -> Result<Arc<Tls>> {
    c.tls_as(&role).context("the test deployment runs with TLS")
}

fn channel(addr: &str, tls: Arc<Tls>) -> Result<Channel> {
    Ok(lazy_channel(
        addr,
        Some(Duration::from_secs(10)),
        &Security::Tls(tls),
    )?)
}

/// A TLS connection that presents no certificate (it still checks the server's).
fn anonymous_channel(c: &Cluster, addr: &str) -> Result<Channel> {
    let pki = c.pki.as_ref().context("TLS deployment")?;
    let ca = std::fs::read(pki.dir.join("ca.pem"))?;
    Ok(
        tonic::transport::Endpoint::from_shared(format!("https://{addr}"))?
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(ca))
                    .domain_name("127.0.0.1"),
            )?
            .timeout(Duration::from_secs(10))
            .connect_lazy(),
    )
}

fn agent_as(c: &Cluster, p: &str, role: Role) -> Result<AgentClient<Channel>> {
    Ok(AgentClient::new(channel(&c.agent_addrs[p], tls(c, role)?)?))
}

fn acceptor_as(c: &Cluster, i: usize, role: Role) -> Result<AcceptorClient<Channel>> {
    Ok(AcceptorClient::new(channel(
        &c.replica_addrs[i],
        tls(c, role)?,
    )?))
}

fn client() -> Role {
    Role::Client("mallory".into())
}

fn operator() -> Role {
    Role::Operator("mallory".into())
}

fn expect_code<T: std::fmt::Debug>(
    what: &str,
    r: Result<T, tonic::Status>,
    codes: &[Code],
) -> Result<()> {
    match r {
        Ok(v) => anyhow::bail!("{what}: accepted ({v:?}), expected one of {codes:?}"),
        Err(s) => {
            eprintln!("{what}: {:?} {}", s.code(), s.message());
            ensure!(
                codes.contains(&s.code()),
                "{what}: got {:?} ({}), expected one of {codes:?}",
                s.code(),
                s.message()
            );
            Ok(())
        }
    }
}

/// Money neither created nor destroyed, every transfer in all its databases or in none, and
/// nothing of ours left prepared.
async fn assert_no_split(c: &Cluster, txids: &[&str]) -> Result<()> {
    if let Err(e) = c.wait_no_prepared(Duration::from_secs(30)).await {
        panic!("{e:#}");
    }
    let total: i64 = bank::totals(c).await?.values().sum();
    assert_eq!(
        total,
        2 * i64::from(ACCOUNTS) * BALANCE,
        "money created or destroyed"
    );
    for txid in txids {
        let rows = bank::rows_of(c, txid).await?;
        let state = c.wait_decided(txid, Duration::from_secs(30)).await?;
        match state {
            pb::TxnState::Committed => assert!(rows.values().all(|n| *n == 1), "{rows:?}"),
            _ => assert!(rows.values().all(|n| *n == 0), "{state:?} {rows:?}"),
        }
        eprintln!("{txid}: {state:?}, rows {rows:?}");
    }
    Ok(())
}

/// Runs the statements of a transfer on both databases without committing.
async fn open_transfer(client: &Client, amount: i64) -> Result<String> {
    let txn = client.begin().await?;
    for (p, delta) in [(A, -amount), (B, amount)] {
        txn.execute(
            p,
            "UPDATE accounts SET balance = balance + $1 WHERE id = 1",
            &[pb::Value::from(delta)],
        )
        .await?;
        txn.execute(
            p,
            "INSERT INTO transfers (txid, account, delta) VALUES ($1, 1, $2)",
            &[pb::Value::from(txn.id()), pb::Value::from(delta)],
        )
        .await?;
    }
    // Left open: the attacks go at it by id, and it commits at the end.
    Ok(txn.detach())
}

/// Attacks 1 and 2: both branches prepared and the leader gone before it told anyone. A
/// forged Decide (anonymous, as a client, or as an operator contradicting the group) and a
/// heuristic abort that contradicts the votes on record must all be refused.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_decisions_and_heuristics_cannot_split_a_prepared_transfer() -> Result<()> {
    let markers = tempfile::tempdir()?;
    let mut spec = Spec::new("attack-decide", 3, &[A, B]).crash_replica_at(
        0,
        "coordinator-after-decision",
        &markers.path().join("r0"),
    );
    // Keep the prepared branches in doubt while the attacks run.
    spec.takeover_after_ms = 120_000;
    spec.in_doubt_after_ms = 120_000;
    let c = deployment(spec).await?;
    let leader_only = Client::new(&ClientConfig {
        replicas: vec![c.replica_addrs[0].clone()],
        agents: c.agent_addrs.clone(),
        rpc_timeout: Some(Duration::from_secs(10)),
        tls: c.client_tls(),
    })?;
    let (txid, outcome) = bank::transfer(&leader_only, (A, 1), (B, 1), 100).await?;
    c.replicas[0].wait_exit(Duration::from_secs(5))?;
    ensure!(
        matches!(outcome, TransferOutcome::Unknown(_)),
        "{outcome:?}"
    );
    ensure!(c.prepared(A).await?.len() == 1 && c.prepared(B).await?.len() == 1);
    let decide = |outcome: pb::Outcome| pb::DecideRequest {
        txid: txid.clone(),
        outcome: outcome as i32,
    };

    // Attack 1: Committed to one agent, Aborted to the other.
    let mut anon = AgentClient::new(anonymous_channel(&c, &c.agent_addrs[B])?);
    expect_code(
        "anonymous Decide",
        anon.decide(decide(pb::Outcome::Aborted)).await,
        &[Code::Unauthenticated],
    )?;
    let mut as_client = agent_as(&c, B, client())?;
    expect_code(
        "a client's Decide",
        as_client.decide(decide(pb::Outcome::Aborted)).await,
        &[Code::PermissionDenied],
    )?;
    let mut as_replica = agent_as(&c, B, Role::Replica(1))?;
    expect_code(
        "a replica's unary Decide",
        as_replica.decide(decide(pb::Outcome::Aborted)).await,
        &[Code::PermissionDenied],
    )?;
    // An operator may push a decision, but only the one the group chose: the agent asks the
    // group (a replica takes the transaction over and finds both Prepared votes).
    let mut op_b = agent_as(&c, B, operator())?;

    // Attack 2: a heuristic abort, as a client, without force, and with force, while both
    // branches are prepared and the replicas hold both Prepared votes.
    let heuristic = |force: bool| pb::HeuristicRequest {
        gid: c.prepared_gid(B, &txid),
        outcome: pb::Outcome::Aborted as i32,
        force,
    };
    expect_code(
        "a client's Heuristic",
        as_client.heuristic(heuristic(true)).await,
        &[Code::PermissionDenied],
    )?;
    expect_code(
        "a Heuristic without force",
        op_b.heuristic(heuristic(false)).await,
        &[Code::FailedPrecondition],
    )?;
    expect_code(
        "a forced Heuristic abort while every participant has a Prepared vote on record",
        op_b.heuristic(heuristic(true)).await,
        &[Code::FailedPrecondition],
    )?;
    ensure!(c.prepared(B).await?.len() == 1);
    // The agent asks the group, which (a replica takes the transaction over) finds both
    // Prepared votes: Committed, not Aborted.
    expect_code(
        "an operator's Decide that contradicts the group",
        op_b.decide(decide(pb::Outcome::Aborted)).await,
        &[Code::FailedPrecondition],
    )?;

    // The operator's consistent Decide is applied, and recovery finishes the rest.
    let mut op_a = agent_as(&c, A, operator())?;
    op_a.decide(decide(pb::Outcome::Committed)).await?;
    c.restart_replica(0).await?;
    let mut op_b = agent_as(&c, B, operator())?;
    op_b.decide(decide(pb::Outcome::Committed)).await?;
    assert_no_split(&c, &[&txid]).await?;
    ensure!(c.status(&txid).await?.state == pb::TxnState::Committed as i32);
    // The refused heuristic left its trace for an audit.
    let audit = c
        .db(B)
        .await?
        .query(
            "SELECT count(*) FROM paxos_commit.heuristic_log WHERE result = 'done'",
            &[],
        )
        .await?;
    ensure!(audit[0].get::<_, i64>(0) == 0, "no heuristic was applied");
    Ok(())
}

/// Attacks 3, 4 and 5, and impersonation: forged Paxos messages to the acceptors.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn forged_paxos_messages_are_refused() -> Result<()> {
    let c = deployment(Spec::new("attack-paxos", 3, &[A, B])).await?;
    let txid = open_transfer(&c.client, 10).await?;
    let msg = |from: u32, body: pb::paxos_message::Body| pb::PaxosBatch {
        messages: vec![pb::PaxosMessage {
            txid: txid.clone(),
            from_replica: from,
            body: Some(body),
            traceparent: String::new(),
        }],
    };
    let decided = pb::paxos_message::Body::Decided(pb::Decided {
        outcome: pb::Outcome::Committed as i32,
        participants: Vec::new(),
    });
    let phase2b = |p: &str| {
        pb::paxos_message::Body::Phase2b(pb::Phase2b {
            participant: p.to_string(),
            ballot: 0,
            vote: pb::Vote::Prepared as i32,
        })
    };
    for i in 0..3 {
        // Attack 3: a forged decision, anonymous, as a client and as an agent.
        let mut anon = AcceptorClient::new(anonymous_channel(&c, &c.replica_addrs[i])?);
        expect_code(
            "anonymous Decided",
            anon.deliver(msg(1, decided.clone())).await,
            &[Code::Unauthenticated],
        )?;
        expect_code(
            "a client's Decided",
            acceptor_as(&c, i, client())?
                .deliver(msg(1, decided.clone()))
                .await,
            &[Code::PermissionDenied],
        )?;
        expect_code(
            "an agent's Decided",
            acceptor_as(&c, i, Role::Agent(A.into()))?
                .deliver(msg(1, decided.clone()))
                .await,
            &[Code::PermissionDenied],
        )?;
        // Attack 4: a phase 2b for another participant's instance, from an agent.
        expect_code(
            "an agent's phase 2b",
            acceptor_as(&c, i, Role::Agent(A.into()))?
                .deliver(msg(0, phase2b(B)))
                .await,
            &[Code::PermissionDenied],
        )?;
        // An agent votes for its own instance only.
        let vote_for_b = pb::paxos_message::Body::Phase2a(pb::Phase2a {
            participant: B.into(),
            ballot: 0,
            vote: pb::Vote::Prepared as i32,
            participants: vec![pb::Participant {
                id: B.into(),
                address: c.agent_addrs[B].clone(),
            }],
            cause: None,
        });
        expect_code(
            "agent A's vote for B",
            acceptor_as(&c, i, Role::Agent(A.into()))?
                .deliver(msg(0, vote_for_b))
                .await,
            &[Code::PermissionDenied],
        )?;
        // A replica that claims to be another.
        let other = (i + 1) % 3;
        expect_code(
            "a replica claiming another's index",
            acceptor_as(&c, i, Role::Replica(other as u32))?
                .deliver(msg(((other + 1) % 3) as u32, phase2b(A)))
                .await,
            &[Code::PermissionDenied],
        )?;
        // Attack 5: a phase 1a with an absurd ballot, even from a real replica certificate.
        let huge = pb::paxos_message::Body::Phase1a(pb::Phase1a {
            ballot: u64::MAX,
            participants: Vec::new(),
        });
        expect_code(
            "a phase 1a with ballot u64::MAX",
            acceptor_as(&c, i, Role::Replica(other as u32))?
                .deliver(msg(other as u32, huge))
                .await,
            &[Code::PermissionDenied, Code::InvalidArgument],
        )?;
    }
    // An agent resolves its own instance only, and must name it: a short R given by anyone
    // else could once make a takeover commit a subset of the transaction.
    let mut agent_a = CoordinatorClient::new(channel(
        &c.replica_addrs[1],
        tls(&c, Role::Agent(A.into()))?,
    )?);
    for participant in ["", B] {
        expect_code(
            &format!("agent A resolving as {participant:?}"),
            agent_a
                .resolve(pb::ResolveRequest {
                    txid: txid.clone(),
                    participant: participant.into(),
                    participants: vec![pb::Participant {
                        id: A.into(),
                        address: c.agent_addrs[A].clone(),
                    }],
                })
                .await,
            &[Code::PermissionDenied],
        )?;
    }
    // A client certificate cannot reach the operators' and replicas' calls either.
    let mut as_client = agent_as(&c, A, client())?;
    expect_code(
        "a client's ListPrepared",
        as_client.list_prepared(pb::Empty {}).await,
        &[Code::PermissionDenied],
    )?;
    // Nothing of that changed the transaction: it commits normally, in both databases.
    let txn = c.client.transaction(&txid, 0);
    let decision = txn.commit().await?;
    ensure!(
        decision.outcome == paxos_commit_core::Outcome::Committed,
        "{decision:?}"
    );
    assert_no_split(&c, &[&txid]).await?;
    Ok(())
}

/// Anonymous, expired and foreign certificates, and a client on a replica's calls.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn only_certificates_of_the_deployment_get_in() -> Result<()> {
    let c = deployment(Spec::new("attack-certs", 1, &[A])).await?;
    let addr = c.replica_addrs[0].clone();
    let mut anon = CoordinatorClient::new(anonymous_channel(&c, &addr)?);
    expect_code(
        "anonymous Begin",
        anon.begin(pb::BeginRequest::default()).await,
        &[Code::Unauthenticated],
    )?;
    let plaintext = Client::new(&ClientConfig {
        replicas: vec![addr.clone()],
        agents: c.agent_addrs.clone(),
        rpc_timeout: Some(Duration::from_secs(5)),
        tls: None,
    })?;
    let refused = plaintext.begin().await;
    ensure!(refused.is_err(), "a plaintext Begin was served");
    eprintln!("plaintext Begin: {:?}", refused.err());

    let pki = c.pki.as_ref().context("TLS deployment")?;
    let ca_pem = std::fs::read(pki.dir.join("ca.pem"))?;
    let expired = pki.issue(&client(), Validity::expired())?;
    let foreign_ca = Ca::new(&c.spec.group, Validity::days(1))?;
    let foreign = foreign_ca.issue(
        &c.spec.group,
        &client(),
        &["127.0.0.1".into()],
        Validity::days(1),
    )?;
    for (what, issued) in [("expired", expired), ("foreign", foreign)] {
        let tls = Arc::new(Tls::from_pem(
            ca_pem.clone(),
            issued.cert_pem.into_bytes(),
            issued.key_pem.into_bytes(),
        )?);
        let mut coord = CoordinatorClient::new(channel(&addr, tls)?);
        let r = coord.begin(pb::BeginRequest::default()).await;
        ensure!(
            r.is_err(),
            "a client with an {what} certificate began a transaction"
        );
        eprintln!("{what} certificate: {:?}", r.err().map(|s| s.code()));
    }
    // A client may not speak for a replica, nor ask what only operators ask.
    let mut as_client = CoordinatorClient::new(channel(&addr, tls(&c, client())?)?);
    expect_code(
        "a client's ClusterInfo",
        as_client.cluster_info(pb::Empty {}).await,
        &[Code::PermissionDenied],
    )?;
    expect_code(
        "a client's Resolve",
        as_client
            .resolve(pb::ResolveRequest {
                txid: "0000000000000001".into(),
                participant: A.into(),
                participants: Vec::new(),
            })
            .await,
        &[Code::PermissionDenied],
    )?;
    // And the right certificate works.
    let (txid, outcome) = bank::transfer(&c.client, (A, 1), (A, 2), 5).await?;
    ensure!(outcome == TransferOutcome::Committed, "{outcome:?}");
    ensure!(bank::rows_of(&c, &txid).await?[A] == 2);
    Ok(())
}

/// Attack 6 (no attacker needed): statements that end, prepare or escape the branch, however
/// they are dressed up, are refused; session state cannot leak to the next branch.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn statements_cannot_escape_their_branch() -> Result<()> {
    let c = deployment(Spec::new("attack-sql", 1, &[A, B])).await?;
    let bypasses = [
        "/* note */ COMMIT",
        "-- x\nROLLBACK",
        "/**/PREPARE TRANSACTION 'x'",
        "/* a /* nested */ comment */ END",
        "\u{a0}COMMIT",
        "commit;",
        "SELECT 1; COMMIT",
        "UPDATE accounts SET balance = 0 WHERE id = 2; COMMIT",
        "BEGIN",
        "START TRANSACTION",
        "ABORT",
        "COMMIT PREPARED 'x'",
        "ROLLBACK PREPARED 'x'",
        "SET lock_timeout = 0",
        "SET LOCAL lock_timeout = 0",
        "SET LOCAL statement_timeout = 0",
        "SET search_path = evil",
        "SET SESSION AUTHORIZATION DEFAULT",
        "RESET ALL",
        "DISCARD ALL",
        "LISTEN x",
        "DEALLOCATE ALL",
        "DO $$ BEGIN COMMIT; END $$",
        "CALL pg_catalog.nothing()",
        "COPY accounts TO STDOUT",
        "VACUUM accounts",
    ];
    let mut txids = Vec::new();
    for sql in bypasses {
        let txn = c.client.begin().await?;
        txids.push(txn.id().to_string());
        txn.execute(
            A,
            "UPDATE accounts SET balance = balance - 100 WHERE id = 1",
            &[],
        )
        .await?;
        txn.execute(
            A,
            "INSERT INTO transfers (txid, account, delta) VALUES ($1, 1, -100)",
            &[pb::Value::from(txn.id())],
        )
        .await?;
        let r = txn.execute(A, sql, &[]).await;
        let code = r.as_ref().err().and_then(|e| e.code());
        eprintln!(
            "{sql:?}: {:?}",
            r.as_ref().map(|_| ()).map_err(|e| e.to_string())
        );
        ensure!(
            code == Some(Code::InvalidArgument),
            "{sql:?} was not refused as invalid: {r:?}"
        );
        let d = txn.abort().await?;
        ensure!(d.outcome == paxos_commit_core::Outcome::Aborted, "{d:?}");
    }
    // Nothing of the aborted transactions stayed, and nothing is left prepared, ours or not.
    ensure!(
        bank::balance(&c, A, 1).await? == BALANCE,
        "an aborted debit stayed"
    );
    for txid in &txids {
        ensure!(bank::rows_of(&c, txid).await?.values().all(|n| *n == 0));
    }
    for p in [A, B] {
        let left = c
            .db(p)
            .await?
            .query("SELECT gid FROM pg_prepared_xacts", &[])
            .await?;
        ensure!(
            left.is_empty(),
            "{p}: {} prepared transaction(s) left",
            left.len()
        );
    }

    // Session state through functions, other sessions, SQL built at run time, and code that
    // would run later: refused too.
    for sql in [
        "SELECT set_config('search_path', 'pg_catalog', false)",
        "SELECT pg_advisory_lock(42)::text",
        "SELECT pg_terminate_backend(pid) FROM pg_locks WHERE locktype = 'advisory'",
        "SELECT query_to_xml('DELETE FROM transfers RETURNING 1', true, false, '')",
        "CREATE FUNCTION sneaky() RETURNS int LANGUAGE sql AS $$ SELECT 1 $$",
        "DROP OWNED BY CURRENT_USER",
    ] {
        let txn = c.client.begin().await?;
        let r = txn.execute(A, sql, &[]).await;
        eprintln!(
            "{sql:?}: {:?}",
            r.as_ref().map(|_| ()).map_err(|e| e.to_string())
        );
        ensure!(
            r.as_ref().err().and_then(|e| e.code()) == Some(Code::InvalidArgument),
            "{sql:?} was not refused: {r:?}"
        );
        txn.abort().await?;
    }
    // A setting the branch may change (SET LOCAL) ends with it.
    let txn = c.client.begin().await?;
    txn.execute(A, "SET LOCAL search_path = pg_catalog", &[])
        .await?;
    ensure!(txn.commit().await?.outcome == paxos_commit_core::Outcome::Committed);
    for _ in 0..5 {
        let txn = c.client.begin().await?;
        let r = txn.execute(A, "SHOW search_path", &[]).await?;
        let path = r.rows[0].values[0]
            .as_text()
            .unwrap_or_default()
            .to_string();
        let locked = txn
            .execute(A, "SELECT pg_try_advisory_xact_lock(42)", &[])
            .await?;
        txn.commit().await?;
        ensure!(path == "\"$user\", public", "search_path leaked: {path:?}");
        ensure!(
            locked.rows[0].values[0].kind == Some(pb::value::Kind::Bool(true)),
            "a session advisory lock leaked to the next branch"
        );
    }
    let (txid, outcome) = bank::transfer(&c.client, (A, 1), (B, 1), 7).await?;
    ensure!(outcome == TransferOutcome::Committed, "{outcome:?}");
    assert_no_split(&c, &[&txid]).await?;
    Ok(())
}

/// Attack 7 (no attacker needed): a second agent for the same participant and database, by
/// mistake, must refuse to start; the first one goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_second_agent_for_one_database_refuses_to_start() -> Result<()> {
    let c = deployment(Spec::new("attack-twin", 1, &[A, B])).await?;
    let first = c.agent(A)?;
    let mut args = first.args().to_vec();
    let listen = args
        .iter()
        .position(|a| a == "--listen")
        .context("--listen")?;
    args[listen + 1] = format!(
        "127.0.0.1:{}",
        paxos_commit_integration::process::free_port()?
    );
    let twin = paxos_commit_integration::process::Proc::spawn(
        "agent-twin",
        first.binary(),
        &args,
        &[("RUST_LOG".into(), "info".into())],
        c.dir.join("agent-twin.log"),
    )?;
    let status = twin.wait_exit(Duration::from_secs(30))?;
    let log = twin.log_tail(20);
    eprintln!("twin exited with {status:?}:\n{log}");
    ensure!(!status.success(), "the twin agent exited successfully");
    ensure!(
        log.contains("another agent"),
        "the twin's log does not say why it refused"
    );
    let (txid, outcome) = bank::transfer(&c.client, (A, 1), (B, 1), 3).await?;
    ensure!(outcome == TransferOutcome::Committed, "{outcome:?}");
    assert_no_split(&c, &[&txid]).await?;
    Ok(())
}

/// Bounded input: requests too large for any server answer RESOURCE_EXHAUSTED, statements
/// and parameter lists beyond the agent's limits INVALID_ARGUMENT (never a retryable code),
/// and none of it leaves anything behind.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn oversized_requests_get_clear_codes() -> Result<()> {
    let c = deployment(Spec::new("attack-sizes", 1, &[A])).await?;
    let cases: [(&str, String, usize, Code); 3] = [
        // Above the 8 MiB a server decodes at all.
        (
            "a 9 MiB request",
            format!("SELECT 1 /* {} */", "x".repeat(9 << 20)),
            0,
            Code::ResourceExhausted,
        ),
        // Decoded, but above the agent's 1 MiB statement limit.
        (
            "a 2 MiB statement",
            format!("SELECT 1 /* {} */", "x".repeat(2 << 20)),
            0,
            Code::InvalidArgument,
        ),
        // Beyond what the PostgreSQL protocol can carry.
        (
            "65536 parameters",
            "SELECT 1".to_string(),
            65_536,
            Code::InvalidArgument,
        ),
    ];
    for (what, sql, n, code) in cases {
        let txn = c.client.begin().await?;
        let params = vec![pb::Value::from(1); n];
        let r = txn.execute(A, &sql, &params).await;
        eprintln!("{what}: {:?}", r.as_ref().map(|_| ()).map_err(|e| e.code()));
        ensure!(
            r.as_ref().err().and_then(|e| e.code()) == Some(code),
            "{what}: expected {code:?}, got {:?}",
            r.as_ref().map(|_| ()).map_err(|e| e.to_string())
        );
        txn.abort().await?;
    }
    let (txid, outcome) = bank::transfer(&c.client, (A, 1), (A, 2), 5).await?;
    ensure!(outcome == TransferOutcome::Committed, "{outcome:?}");
    ensure!(bank::rows_of(&c, &txid).await?[A] == 2);
    if let Err(e) = c.wait_no_prepared(Duration::from_secs(30)).await {
        panic!("{e:#}");
    }
    Ok(())
}

/// The audit's read calls (Coordinator.Outcomes, Coordinator.ListCommitted, Agent.ListProofs):
/// only operators and replicas may make them, whatever the message says; a list longer than
/// a page, or a txid that is not one, gets INVALID_ARGUMENT, and nothing is read.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_calls_are_for_operators_and_refuse_malformed_lists() -> Result<()> {
    let c = deployment(Spec::new("attack-audit", 1, &[A])).await?;
    let (replica, agent) = (c.replica_addrs[0].clone(), c.agent_addrs[A].clone());
    let as_role = |role: Role| -> Result<(CoordinatorClient<Channel>, AgentClient<Channel>)> {
        let t = tls(&c, role)?;
        Ok((
            CoordinatorClient::new(channel(&replica, t.clone())?),
            AgentClient::new(channel(&agent, t)?),
        ))
    };
    let too_many = vec!["0011223344556677".to_string(); 10_001];
    let malformed = vec!["'; DROP TABLE accounts; --".to_string()];

    for role in [Role::Client("test".into()), Role::Agent(A.into())] {
        let (mut coord, mut agent) = as_role(role.clone())?;
        let outcomes = coord
            .outcomes(pb::OutcomesRequest {
                txids: vec!["0011223344556677".into()],
            })
            .await;
        let committed = coord
            .list_committed(pb::ListCommittedRequest::default())
            .await;
        let proofs = agent.list_proofs(pb::ListProofsRequest::default()).await;
        for (call, code) in [
            ("Outcomes", outcomes.err().map(|s| s.code())),
            ("ListCommitted", committed.err().map(|s| s.code())),
            ("ListProofs", proofs.err().map(|s| s.code())),
        ] {
            ensure!(
                code == Some(Code::PermissionDenied),
                "{role} called {call}: {code:?}"
            );
        }
    }

    let (mut coord, mut agent) = as_role(Role::Operator("test".into()))?;
    for txids in [too_many.clone(), malformed.clone()] {
        let code = coord
            .outcomes(pb::OutcomesRequest {
                txids: txids.clone(),
            })
            .await
            .err()
            .map(|s| s.code());
        ensure!(code == Some(Code::InvalidArgument), "Outcomes: {code:?}");
        let code = agent
            .list_proofs(pb::ListProofsRequest {
                txids,
                ..Default::default()
            })
            .await
            .err()
            .map(|s| s.code());
        ensure!(code == Some(Code::InvalidArgument), "ListProofs: {code:?}");
    }
    let code = coord
        .list_committed(pb::ListCommittedRequest {
            after_txid: malformed[0].clone(),
            limit: 0,
        })
        .await
        .err()
        .map(|s| s.code());
    ensure!(
        code == Some(Code::InvalidArgument),
        "ListCommitted: {code:?}"
    );
    // A hostile cursor or limit is only a cursor: the answer is still one bounded page.
    let page = agent
        .list_proofs(pb::ListProofsRequest {
            after_txid: malformed[0].clone(),
            limit: u32::MAX,
            txids: Vec::new(),
            younger_than_ms: u64::MAX,
        })
        .await?
        .into_inner();
    ensure!(page.proofs.len() <= 10_000);
    // The database is as it was.
    ensure!(bank::totals(&c).await?[A] == i64::from(ACCOUNTS) * BALANCE);
    Ok(())
}

/// The agent believes PREPARE TRANSACTION from its command tag alone (no look at
/// `pg_prepared_xacts`): outside a transaction block PREPARE is a mere WARNING, so the
/// assertion in front of it must stop every way of reaching it from anywhere but the branch's
/// own transaction. Tried here with the agent's own batch, on the real database: outside any
/// transaction, in a transaction begun by the same message, with a marker forged in that
/// transaction, and (the one that must work) inside a branch begun earlier.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prepare_runs_only_inside_the_branch_s_own_transaction() -> Result<()> {
    let c = deployment(Spec::new("attack-prepare", 1, &[A, B])).await?;
    let db = c.db(A).await?;
    let batch = |n: u32| {
        paxos_commit_agent::branches::prepare_sql(
            &format!("try-{n}"),
            A,
            &[A, B],
            &format!("try-{n}"),
        )
    };
    let refusals = [
        // No transaction at all: the batch is its own implicit transaction.
        batch(1),
        // A transaction begun in the same message, marked as the branch.
        format!(
            "BEGIN; SET LOCAL paxos_commit.branch = 'try-2'; {}",
            batch(2)
        ),
        // The marker forged with set_config in this message's implicit transaction.
        format!(
            "SELECT pg_catalog.set_config('paxos_commit.branch', 'try-3', true); {}",
            batch(3)
        ),
        // A transaction begun earlier, but marked as another branch.
        batch(4),
    ];
    for (i, sql) in refusals.iter().enumerate() {
        if i == 3 {
            db.batch_execute("BEGIN; SET LOCAL paxos_commit.branch = 'try-other'")
                .await?;
        }
        let e = db
            .batch_execute(sql)
            .await
            .err()
            .with_context(|| format!("attempt {} prepared", i + 1))?;
        ensure!(
            e.code() == Some(&tokio_postgres::error::SqlState::INVALID_TRANSACTION_STATE),
            "attempt {}: {e}",
            i + 1
        );
        // Ends what attempts 2 and 4 left open and aborted (a mere warning otherwise).
        db.batch_execute("ROLLBACK").await?;
        ensure!(
            leftovers(&db).await? == (0, 0),
            "attempt {} left something",
            i + 1
        );
    }

    // The branch's own transaction, begun in an earlier message: it prepares, and every
    // statement of the batch reports completion (the agent counts them).
    db.batch_execute("BEGIN; SET LOCAL paxos_commit.branch = 'try-5'")
        .await?;
    db.batch_execute("UPDATE accounts SET balance = balance WHERE id = 1")
        .await?;
    let messages = db.simple_query(&batch(5)).await?;
    let completed = messages
        .iter()
        .filter(|m| matches!(m, tokio_postgres::SimpleQueryMessage::CommandComplete(_)))
        .count();
    ensure!(completed == 9, "{completed} statements completed");
    ensure!(
        leftovers(&db).await? == (1, 0),
        "the branch did not prepare"
    );
    db.batch_execute("ROLLBACK PREPARED 'try-5'").await?;
    Ok(())
}

/// Prepared transactions and commit proofs of `prepare_runs_only_inside_the_branch_s_own_transaction`.
async fn leftovers(db: &tokio_postgres::Client) -> Result<(usize, usize)> {
    let prepared = db
        .query(
            "SELECT gid FROM pg_prepared_xacts WHERE gid LIKE 'try-%'",
            &[],
        )
        .await?;
    let proofs = db
        .query(
            "SELECT txid FROM paxos_commit.committed WHERE txid LIKE 'try-%'",
            &[],
        )
        .await?;
    Ok((prepared.len(), proofs.len()))
}
