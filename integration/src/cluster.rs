//! A whole deployment on loopback for tests, the demo and benchmarks: one PostgreSQL cluster
//! and one participant agent per database, and 2F+1 coordinator replicas, all real processes
//! from the built binaries. Everything stops when the `Cluster` is dropped.
//!
//! With [`Spec::with_proxies`], every connection between components (client → replica,
//! client → agent, agent → replica, replica → agent, replica → replica) goes through a fault
//! proxy of [`crate::proxy`], one per directed link, so that a test can partition, delay and
//! break the network between them.

use crate::certs::{Files, TestPki};
use crate::container::Container;
use crate::pg::PgCluster;
use crate::process::{binary_path, free_port, Proc, TestDir};
use crate::proxy::{Net, Node, Source};
use anyhow::{bail, Context, Result};
use paxos_commit_proto::client::{Client, ClientConfig};
use paxos_commit_proto::pb;
use paxos_commit_proto::tls::{Role, Tls};
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What to start.
#[derive(Debug, Clone)]
pub struct Spec {
    /// Test name: labels directories and logs.
    pub name: String,
    /// 2F+1.
    pub replicas: usize,
    /// Participant ids; each gets its own PostgreSQL cluster and agent.
    pub participants: Vec<String>,
    pub takeover_after_ms: u64,
    pub branch_timeout_ms: u64,
    pub in_doubt_after_ms: u64,
    pub commit_timeout_ms: u64,
    pub group: String,
    /// Extra environment for every process (RUST_LOG, ...).
    pub env: Vec<(String, String)>,
    /// Extra environment for one agent (e.g. a crash point).
    pub agent_env: BTreeMap<String, Vec<(String, String)>>,
    /// Extra environment for one replica.
    pub replica_env: BTreeMap<usize, Vec<(String, String)>>,
    /// Route every link between components through a fault proxy (see [`Spec::with_proxies`]).
    pub proxies: bool,
    /// Plaintext instead of mutual TLS (every process started `insecure`): for the benchmark
    /// that measures what TLS costs, and nothing else.
    pub insecure: bool,
    /// TLS between each agent and its PostgreSQL server too (the server gets a certificate of
    /// the deployment's CA; the agent verifies it).
    pub database_tls: bool,
    /// Every replica audits the agents' databases this often (it is told their addresses).
    pub audit_interval_ms: Option<u64>,
    /// Every replica serves its operator page ([`Cluster::operator_pages`]), and is told the
    /// agents' addresses so that the page shows them.
    pub operator_page: bool,
    /// Run the replicas and agents from this container image (see [`crate::container`])
    /// instead of the workspace's binaries.
    pub image: Option<String>,
}

impl Spec {
    /// Arms a one-shot crash point (see `paxos_commit_proto::crash_point`) in an agent.
    pub fn crash_agent_at(
        mut self,
        participant: &str,
        point: &str,
        marker: &std::path::Path,
    ) -> Spec {
        self.agent_env
            .entry(participant.to_string())
            .or_default()
            .extend(crash_env(point, marker));
        self
    }

    /// Arms a one-shot crash point in a replica.
    pub fn crash_replica_at(
        mut self,
        replica: usize,
        point: &str,
        marker: &std::path::Path,
    ) -> Spec {
        self.replica_env
            .entry(replica)
            .or_default()
            .extend(crash_env(point, marker));
        self
    }

    /// Routes every link between components through its own fault proxy, reachable as
    /// [`Cluster::net`]:
    ///
    /// * replica i reaches replica j (j ≠ i) through a proxy of link `replica-i → replica-j`
    ///   (its own entry in `--replicas` stays its real address: Begin hands it out);
    /// * agent a reaches replica j through `agent-a → replica-j`;
    /// * the replicas reach agent a at the address it advertises, one proxy that tells the
    ///   replicas apart by the process that connects (links `replica-i → agent-a`);
    /// * the cluster's client reaches replica j and agent a through `client → replica-j` and
    ///   `client → agent-a` ([`Cluster::client_replica_addrs`], [`Cluster::client_agent_addrs`]).
    ///
    /// `replica_addrs` and `agent_addrs` stay the real listen addresses. Agents ↔ PostgreSQL
    /// connections are direct.
    pub fn with_proxies(mut self, on: bool) -> Spec {
        self.proxies = on;
        self
    }

    /// Runs the replicas and agents in containers of `image`.
    pub fn with_image(mut self, image: &str) -> Spec {
        self.image = Some(image.to_string());
        self
    }

    /// Sets an environment variable on every process, replicas and agents.
    pub fn with_env(mut self, key: &str, value: &str) -> Spec {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Sets an environment variable on one agent (after [`Spec::with_env`]'s, so it wins).
    pub fn with_agent_env(mut self, participant: &str, key: &str, value: &str) -> Spec {
        self.agent_env
            .entry(participant.to_string())
            .or_default()
            .push((key.into(), value.into()));
        self
    }

    /// Sets an environment variable on every replica (a short retention, say).
    pub fn with_replica_env(mut self, key: &str, value: &str) -> Spec {
        for i in 0..self.replicas {
            self.replica_env
                .entry(i)
                .or_default()
                .push((key.into(), value.into()));
        }
        self
    }

    pub fn new(name: &str, replicas: usize, participants: &[&str]) -> Spec {
        Spec {
            name: name.to_string(),
            replicas,
            participants: participants.iter().map(|s| s.to_string()).collect(),
            takeover_after_ms: 1_000,
            branch_timeout_ms: 30_000,
            in_doubt_after_ms: 1_000,
            commit_timeout_ms: 10_000,
            group: "test".to_string(),
            agent_env: BTreeMap::new(),
            replica_env: BTreeMap::new(),
            proxies: false,
            insecure: false,
            database_tls: false,
            audit_interval_ms: None,
            operator_page: false,
            image: None,
            env: vec![(
                "RUST_LOG".to_string(),
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".to_string()),
            )],
        }
    }
}

pub struct Cluster {
    pub spec: Spec,
    pub replicas: Vec<Proc>,
    pub replica_addrs: Vec<String>,
    pub agents: BTreeMap<String, Proc>,
    pub agent_addrs: BTreeMap<String, String>,
    pub pgs: BTreeMap<String, PgCluster>,
    /// The client of the deployment (certificate `client/test`); through the proxies when
    /// they are on.
    pub client: Client,
    /// An operator's client (certificate `operator/test`), direct: ClusterInfo, ListPrepared,
    /// Decide and Heuristic are operators' calls.
    pub operator: Client,
    /// The deployment's CA and certificates; `None` when the spec is insecure.
    pub pki: Option<TestPki>,
    /// Where clients reach the replicas: the proxies' addresses, or `replica_addrs`.
    pub client_replica_addrs: Vec<String>,
    /// Where clients reach the agents: the proxies' addresses, or `agent_addrs`.
    pub client_agent_addrs: BTreeMap<String, String>,
    /// The fault proxies, when [`Spec::with_proxies`] is on.
    pub net: Option<Arc<Net>>,
    /// Each replica's operator page (host:port), when [`Spec::operator_page`] is on.
    pub operator_pages: Vec<String>,
    // Dropped last: processes first, then their directory.
    pub dir: TestDir,
}

fn crash_env(point: &str, marker: &std::path::Path) -> Vec<(String, String)> {
    vec![
        ("PAXOS_COMMIT_CRASH_POINT".into(), point.into()),
        (
            "PAXOS_COMMIT_CRASH_ONCE".into(),
            marker.display().to_string(),
        ),
    ]
}

/// Holds a crash point armed with `marker` back: it fires only while its marker file is
/// missing (it creates the file as it fires), so a test can let healthy work run first.
pub fn disarm_crash_point(marker: &std::path::Path) -> Result<()> {
    std::fs::write(marker, b"disarmed").context("writing a crash marker")
}

/// Lets a crash point held back by [`disarm_crash_point`] fire once more.
pub fn arm_crash_point(marker: &std::path::Path) -> Result<()> {
    std::fs::remove_file(marker).context("removing a crash marker")
}

/// A replica's command line the way the StatefulSet gives it: no `--id`, the TLS files and
/// the data directory as `PAXOS_COMMIT_*` variables with `{id}` in their paths, and
/// `PAXOS_COMMIT_ID_FROM_HOSTNAME` (the container's host name is `coordinator-<i>`).
fn as_in_a_stateful_set(
    i: usize,
    args: Vec<String>,
    mut env: Vec<(String, String)>,
) -> (Vec<String>, Vec<(String, String)>) {
    let own = format!("replica-{i}");
    let mut kept = Vec::new();
    for pair in args.chunks(2) {
        let [flag, value] = pair else {
            kept.extend(pair.iter().cloned());
            continue;
        };
        let var = match flag.as_str() {
            "--id" => continue,
            "--tls-ca" => "PAXOS_COMMIT_TLS_CA",
            "--tls-cert" => "PAXOS_COMMIT_TLS_CERT",
            "--tls-key" => "PAXOS_COMMIT_TLS_KEY",
            "--data-dir" => "PAXOS_COMMIT_DATA_DIR",
            _ => {
                kept.extend([flag.clone(), value.clone()]);
                continue;
            }
        };
        env.push((var.into(), value.replace(&own, "replica-{id}")));
    }
    env.push(("PAXOS_COMMIT_ID_FROM_HOSTNAME".into(), "true".into()));
    (kept, env)
}

fn addr(port: u16) -> String {
    format!("127.0.0.1:{port}")
}

impl Cluster {
    pub async fn start(spec: Spec) -> Result<Cluster> {
        let dir = TestDir::new(&spec.name)?;
        let pki = if spec.insecure {
            None
        } else {
            Some(TestPki::new(&dir.join("certs"), &spec.group)?)
        };
        let security_args = |role: Role| -> Result<Vec<String>> {
            Ok(match &pki {
                Some(pki) => pki.files(&role)?.args(),
                None => vec!["--insecure".into(), "true".into()],
            })
        };
        let names: Vec<&str> = spec.participants.iter().map(String::as_str).collect();
        let pgs = tokio::task::block_in_place(|| PgCluster::start_all(&names))?;
        let pgs: BTreeMap<String, PgCluster> = spec.participants.iter().cloned().zip(pgs).collect();

        let replica_addrs: Vec<String> = (0..spec.replicas)
            .map(|_| free_port().map(addr))
            .collect::<Result<_>>()?;
        let agent_listen: BTreeMap<String, String> = pgs
            .keys()
            .map(|p| Ok((p.clone(), addr(free_port()?))))
            .collect::<Result<_>>()?;
        let replica_dir = |i: usize| dir.join(format!("replica-{i}")).display().to_string();
        let routes = if spec.proxies {
            Routes::proxied(&replica_addrs, &agent_listen, &replica_dir).await?
        } else {
            Routes::direct(&replica_addrs, &agent_listen)
        };
        let container = spec.image.as_ref().map(|image| Container {
            image: image.clone(),
            shared_dir: dir.path().to_path_buf(),
        });
        let unique = dir
            .path()
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let writable: Vec<PathBuf> = (0..spec.replicas).map(|i| replica_dir(i).into()).collect();
        let certs = pki.as_ref().map(|p| p.dir.clone());
        // A server from the workspace's binaries, or from the image.
        let launch = |name: &str,
                      hostname: Option<&str>,
                      binary: &Path,
                      args: &[String],
                      env: &[(String, String)],
                      log: PathBuf|
         -> Result<Proc> {
            match &container {
                None => Proc::spawn(name, binary, args, env, log),
                Some(container) => {
                    // Again before each start: a process's certificate is written when its
                    // command line is made.
                    let certs = certs
                        .as_deref()
                        .context("the image runs with TLS: no insecure spec")?;
                    container.share(&writable, certs)?;
                    let program = Path::new("/usr/local/bin")
                        .join(binary.file_name().context("a binary's file name")?);
                    Proc::spawn_in_container(
                        &format!("{unique}-{name}"),
                        container,
                        hostname,
                        &program.display().to_string(),
                        args,
                        env,
                        log,
                    )
                }
            }
        };
        let coordinator = binary_path("coordinator")?;
        let mut replicas = Vec::new();
        let mut operator_pages = Vec::new();
        for i in 0..spec.replicas {
            let mut args = security_args(Role::Replica(i as u32))?;
            args.extend([
                "--id".into(),
                i.to_string(),
                "--group".into(),
                spec.group.clone(),
                "--replicas".into(),
                routes.replica_peers[i].join(","),
                "--data-dir".into(),
                replica_dir(i),
                "--takeover-after-ms".into(),
                spec.takeover_after_ms.to_string(),
                "--commit-timeout-ms".into(),
                spec.commit_timeout_ms.to_string(),
            ]);
            let mut env = spec.env.clone();
            if spec.audit_interval_ms.is_some() || spec.operator_page {
                let agents: Vec<String> = agent_listen
                    .iter()
                    .map(|(p, a)| format!("{p}={a}"))
                    .collect();
                env.push(("PAXOS_COMMIT_AGENTS".into(), agents.join(",")));
            }
            if let Some(every) = spec.audit_interval_ms {
                env.push(("PAXOS_COMMIT_AUDIT_INTERVAL_MS".into(), every.to_string()));
            }
            if spec.operator_page {
                let page = addr(free_port()?);
                env.push(("PAXOS_COMMIT_OPERATOR_LISTEN".into(), page.clone()));
                operator_pages.push(page);
            }
            env.extend(spec.replica_env.get(&i).cloned().unwrap_or_default());
            let hostname = container.is_some().then(|| format!("coordinator-{i}"));
            if hostname.is_some() {
                // As the StatefulSet runs it (deploy/kubernetes): the id from the pod's
                // host name, and `{id}` in the paths instead of the id.
                (args, env) = as_in_a_stateful_set(i, args, env);
            }
            replicas.push(launch(
                &format!("replica-{i}"),
                hostname.as_deref(),
                &coordinator,
                &args,
                &env,
                dir.join(format!("replica-{i}.log")),
            )?);
        }

        if spec.database_tls {
            let pki = pki
                .as_ref()
                .context("TLS to PostgreSQL needs the deployment's CA")?;
            for pg in pgs.values() {
                let issued = pki.ca.issue_host(
                    &["127.0.0.1".into()],
                    paxos_commit_proto::pki::Validity::days(2),
                )?;
                pg.enable_tls(&issued.cert_pem, &issued.key_pem).await?;
            }
        }
        let agent_bin = binary_path("participant-agent")?;
        let mut agents = BTreeMap::new();
        let mut agent_addrs = BTreeMap::new();
        for (p, pg) in &pgs {
            let listen = agent_listen[p].clone();
            let mut args = security_args(Role::Agent(p.clone()))?;
            args.extend([
                "--participant".into(),
                p.clone(),
                "--group".into(),
                spec.group.clone(),
                "--database-url".into(),
                pg.url(),
                "--listen".into(),
                listen.clone(),
                "--coordinators".into(),
                routes.agent_coordinators[p].join(","),
                "--branch-timeout-ms".into(),
                spec.branch_timeout_ms.to_string(),
                "--in-doubt-after-ms".into(),
                spec.in_doubt_after_ms.to_string(),
            ]);
            if spec.database_tls {
                if let Some(pki) = &pki {
                    args.extend([
                        "--database-tls-ca".into(),
                        pki.dir.join("ca.pem").display().to_string(),
                    ]);
                }
            }
            if let Some(advertise) = routes.agent_advertise.get(p) {
                args.extend(["--advertise".into(), advertise.clone()]);
            }
            let mut env = spec.env.clone();
            env.extend(spec.agent_env.get(p).cloned().unwrap_or_default());
            agents.insert(
                p.clone(),
                launch(
                    &format!("agent-{p}"),
                    None,
                    &agent_bin,
                    &args,
                    &env,
                    dir.join(format!("agent-{p}.log")),
                )?,
            );
            agent_addrs.insert(p.clone(), listen);
        }

        let tls = |role: Role| pki.as_ref().map(|p| p.tls(&role)).transpose();
        let client = Client::new(&ClientConfig {
            replicas: routes.client_replicas.clone(),
            agents: routes.client_agents.clone(),
            rpc_timeout: Some(Duration::from_secs(30)),
            tls: tls(Role::Client("test".into()))?,
        })?;
        let operator = Client::new(&ClientConfig {
            replicas: replica_addrs.clone(),
            agents: agent_addrs.clone(),
            rpc_timeout: Some(Duration::from_secs(30)),
            tls: tls(Role::Operator("test".into()))?,
        })?;
        let cluster = Cluster {
            spec,
            operator,
            pki,
            replicas,
            replica_addrs,
            agents,
            agent_addrs,
            pgs,
            client,
            client_replica_addrs: routes.client_replicas,
            client_agent_addrs: routes.client_agents,
            net: routes.net,
            operator_pages,
            dir,
        };
        for i in 0..cluster.replicas.len() {
            cluster.wait_replica(i).await?;
        }
        cluster.wait_admitted(Duration::from_secs(30)).await?;
        for p in cluster.spec.participants.clone() {
            cluster.wait_agent(&p).await?;
        }
        Ok(cluster)
    }

    /// A client configuration reaching the deployment the way [`Cluster::client`] does
    /// (through the proxies when they are on), with another RPC deadline.
    pub fn client_config(&self, rpc_timeout: Duration) -> ClientConfig {
        ClientConfig {
            replicas: self.client_replica_addrs.clone(),
            agents: self.client_agent_addrs.clone(),
            rpc_timeout: Some(rpc_timeout),
            tls: self.client_tls(),
        }
    }

    /// The test client's certificate (`client/test`), unless the cluster is insecure.
    /// A client (certificate `client/test`) that knows replica `i` only: it begins every
    /// transaction there, and cannot settle one by asking another replica.
    pub fn client_of_replica(&self, i: usize) -> Result<Client> {
        Ok(Client::new(&ClientConfig {
            replicas: vec![self.replica_addrs[i].clone()],
            agents: self.agent_addrs.clone(),
            rpc_timeout: None,
            tls: self.client_tls(),
        })?)
    }

    pub fn client_tls(&self) -> Option<Arc<Tls>> {
        self.tls_as(&Role::Client("test".into()))
    }

    /// A certificate of this deployment's CA for any role (`None` when insecure).
    pub fn tls_as(&self, role: &Role) -> Option<Arc<Tls>> {
        self.pki.as_ref().and_then(|p| p.tls(role).ok())
    }

    /// The PEM files of a role, for a command line (txctl's, say).
    pub fn tls_files(&self, role: &Role) -> Result<Option<Files>> {
        self.pki.as_ref().map(|p| p.files(role)).transpose()
    }

    /// A client on the real addresses, bypassing the proxies (for checks after a fault test).
    pub fn direct_client(&self) -> Result<Client> {
        Ok(Client::new(&ClientConfig {
            replicas: self.replica_addrs.clone(),
            agents: self.agent_addrs.clone(),
            rpc_timeout: Some(Duration::from_secs(30)),
            tls: self.client_tls(),
        })?)
    }

    fn sock(a: &str) -> Result<SocketAddr> {
        a.parse().with_context(|| format!("address {a}"))
    }

    pub async fn wait_replica(&self, i: usize) -> Result<()> {
        let proc = &self.replicas[i];
        proc.wait_for_port(Self::sock(&self.replica_addrs[i])?, Duration::from_secs(30))
            .await
            .with_context(|| format!("replica {i} did not start:\n{}", proc.log_tail(30)))
    }

    /// Waits until every replica of a first start is admitted by its peers (each new log
    /// joins before it serves) and says "serving".
    pub async fn wait_admitted(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        for i in 0..self.replicas.len() {
            let mut ops = self
                .operator
                .replica(i)
                .with_context(|| format!("replica {i}"))?;
            loop {
                let state = match ops.cluster_info(pb::Empty {}).await {
                    Ok(info) => info.into_inner().state,
                    Err(status) => format!("{status}"),
                };
                if state == "serving" {
                    break;
                }
                if Instant::now() >= deadline {
                    bail!(
                        "replica {i} is not serving after {timeout:?} ({state}):\n{}",
                        self.replicas[i].log_tail(30)
                    );
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        Ok(())
    }

    pub async fn wait_agent(&self, p: &str) -> Result<()> {
        let proc = self.agent(p)?;
        proc.wait_for_port(Self::sock(&self.agent_addrs[p])?, Duration::from_secs(30))
            .await
            .with_context(|| format!("agent {p} did not start:\n{}", proc.log_tail(30)))
    }

    pub fn agent(&self, p: &str) -> Result<&Proc> {
        self.agents.get(p).with_context(|| format!("no agent {p}"))
    }

    pub fn pg(&self, p: &str) -> Result<&PgCluster> {
        self.pgs.get(p).with_context(|| format!("no database {p}"))
    }

    /// A direct connection to a participant's database (to check what really happened).
    pub async fn db(&self, p: &str) -> Result<tokio_postgres::Client> {
        self.pg(p)?.connect().await
    }

    /// Runs SQL directly on every participant's database (schema set-up).
    pub async fn setup_sql(&self, sql: &str) -> Result<()> {
        for p in self.pgs.keys() {
            self.db(p)
                .await?
                .batch_execute(sql)
                .await
                .with_context(|| format!("set-up SQL on {p}"))?;
        }
        Ok(())
    }

    /// Prepared transactions of our group on a participant's database.
    pub async fn prepared(&self, p: &str) -> Result<Vec<String>> {
        let db = self.db(p).await?;
        let rows = db
            .query(
                "SELECT gid FROM pg_prepared_xacts WHERE gid LIKE 'pxc:%' ORDER BY gid",
                &[],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// The gid under which participant `p` prepares transaction `txid`.
    pub fn prepared_gid(&self, p: &str, txid: &str) -> String {
        format!("pxc:{}:{txid}:{p}", self.spec.group)
    }

    /// Waits until no participant's database holds a prepared transaction of ours.
    pub async fn wait_no_prepared(&self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            let mut left = Vec::new();
            for p in self.pgs.keys() {
                for gid in self.prepared(p).await? {
                    left.push(gid);
                }
            }
            if left.is_empty() {
                return Ok(());
            }
            if start.elapsed() > timeout {
                bail!(
                    "still prepared after {timeout:?}: {left:?}\n{}",
                    self.logs_tail(15)
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    /// The last lines of every process's log, for failure messages.
    pub fn logs_tail(&self, n: usize) -> String {
        let mut s = String::new();
        for p in self.replicas.iter().chain(self.agents.values()) {
            s.push_str(&format!("--- {} ---\n{}\n", p.name(), p.log_tail(n)));
        }
        s
    }

    pub async fn restart_replica(&self, i: usize) -> Result<()> {
        self.replicas[i].restart()?;
        self.wait_replica(i).await
    }

    pub async fn restart_agent(&self, p: &str) -> Result<()> {
        self.agent(p)?.restart()?;
        self.wait_agent(p).await
    }

    /// Status from any replica.
    pub async fn status(&self, txid: &str) -> Result<pb::StatusResponse> {
        Ok(self.client.status(txid).await?)
    }

    /// Waits until GetStatus says the transaction is decided; returns the state.
    pub async fn wait_decided(&self, txid: &str, timeout: Duration) -> Result<pb::TxnState> {
        let start = Instant::now();
        loop {
            if let Ok(s) = self.client.status(txid).await {
                let state = pb::TxnState::try_from(s.state).unwrap_or(pb::TxnState::Unknown);
                if matches!(state, pb::TxnState::Committed | pb::TxnState::Aborted) {
                    return Ok(state);
                }
            }
            if start.elapsed() > timeout {
                bail!(
                    "{txid} not decided after {timeout:?}\n{}",
                    self.logs_tail(20)
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Who reaches whom at which address: the real ones, or the proxies of every link.
struct Routes {
    /// Per replica: its `--replicas` list (its own entry is its real address).
    replica_peers: Vec<Vec<String>>,
    /// Per agent: its `--coordinators` list.
    agent_coordinators: BTreeMap<String, Vec<String>>,
    /// Per agent: its `--advertise` address, when it differs from where it listens.
    agent_advertise: BTreeMap<String, String>,
    client_replicas: Vec<String>,
    client_agents: BTreeMap<String, String>,
    net: Option<Arc<Net>>,
}

impl Routes {
    fn direct(replicas: &[String], agents: &BTreeMap<String, String>) -> Routes {
        Routes {
            replica_peers: vec![replicas.to_vec(); replicas.len()],
            agent_coordinators: agents
                .keys()
                .map(|p| (p.clone(), replicas.to_vec()))
                .collect(),
            agent_advertise: BTreeMap::new(),
            client_replicas: replicas.to_vec(),
            client_agents: agents.clone(),
            net: None,
        }
    }

    async fn proxied(
        replicas: &[String],
        agents: &BTreeMap<String, String>,
        replica_dir: &dyn Fn(usize) -> String,
    ) -> Result<Routes> {
        let net = Net::new();
        let sock = |a: &String| -> Result<SocketAddr> { Cluster::sock(a) };
        let mut replica_peers = Vec::new();
        for i in 0..replicas.len() {
            let mut peers = Vec::new();
            for (j, target) in replicas.iter().enumerate() {
                if i == j {
                    peers.push(target.clone());
                } else {
                    let a = net
                        .proxy(
                            Source::Fixed(Node::Replica(i)),
                            Node::Replica(j),
                            sock(target)?,
                        )
                        .await?;
                    peers.push(a.to_string());
                }
            }
            replica_peers.push(peers);
        }
        // A replica's data directory is on its command line and unique to it: that is how
        // the agents' inbound proxies tell which replica connected.
        let replica_procs: Vec<(Node, String)> = (0..replicas.len())
            .map(|i| (Node::Replica(i), replica_dir(i)))
            .collect();
        let mut agent_coordinators = BTreeMap::new();
        let mut agent_advertise = BTreeMap::new();
        let mut client_agents = BTreeMap::new();
        for (p, listen) in agents {
            let agent = Node::Agent(p.clone());
            let mut coordinators = Vec::new();
            for (j, target) in replicas.iter().enumerate() {
                let a = net
                    .proxy(
                        Source::Fixed(agent.clone()),
                        Node::Replica(j),
                        sock(target)?,
                    )
                    .await?;
                coordinators.push(a.to_string());
            }
            agent_coordinators.insert(p.clone(), coordinators);
            let inbound = net
                .proxy(
                    Source::ByProcess(replica_procs.clone()),
                    agent.clone(),
                    sock(listen)?,
                )
                .await?;
            agent_advertise.insert(p.clone(), inbound.to_string());
            let from_client = net
                .proxy(Source::Fixed(Node::Client), agent, sock(listen)?)
                .await?;
            client_agents.insert(p.clone(), from_client.to_string());
        }
        let mut client_replicas = Vec::new();
        for (j, target) in replicas.iter().enumerate() {
            let a = net
                .proxy(Source::Fixed(Node::Client), Node::Replica(j), sock(target)?)
                .await?;
            client_replicas.push(a.to_string());
        }
        Ok(Routes {
            replica_peers,
            agent_coordinators,
            agent_advertise,
            client_replicas,
            client_agents,
            net: Some(net),
        })
    }
}
