//! Agent configuration: a TOML file, overridden by flags and `PAXOS_AGENT_*` variables.

use crate::db_tls::DbConnect;
use clap::Args;
use paxos_commit_proto::tls::{valid_name, Role, Security};
use serde::Deserialize;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {}: {source}", path.display())]
    Parse {
        path: PathBuf,
        source: toml::de::Error,
    },
    #[error("invalid configuration: {0}")]
    Invalid(String),
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    participant: Option<String>,
    group: Option<String>,
    database_url: Option<String>,
    tls_ca: Option<PathBuf>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    insecure: Option<bool>,
    database_tls_ca: Option<PathBuf>,
    listen: Option<String>,
    advertise: Option<String>,
    coordinators: Option<Vec<String>>,
    pool_size: Option<usize>,
    branch_timeout_ms: Option<u64>,
    in_doubt_after_ms: Option<u64>,
    lock_timeout_ms: Option<u64>,
    statement_timeout_ms: Option<u64>,
    max_statement_bytes: Option<usize>,
    max_result_bytes: Option<usize>,
    pool_wait_timeout_ms: Option<u64>,
    max_open_branches: Option<usize>,
    max_concurrent_calls: Option<usize>,
    commit_proof_retention_ms: Option<u64>,
    drain_timeout_ms: Option<u64>,
    metrics_listen: Option<String>,
    health_listen: Option<String>,
}

#[derive(Debug, Clone, Default, Args)]
pub struct AgentArgs {
    /// TOML configuration file.
    #[arg(long, env = "PAXOS_AGENT_CONFIG")]
    pub config: Option<PathBuf>,
    /// This participant's id (unique in the deployment, e.g. bank_a).
    #[arg(long, env = "PAXOS_AGENT_PARTICIPANT")]
    pub participant: Option<String>,
    /// Name of the coordinator group (must match the replicas').
    #[arg(long, env = "PAXOS_AGENT_GROUP")]
    pub group: Option<String>,
    /// PostgreSQL connection URL of this participant's database.
    #[arg(long, env = "PAXOS_AGENT_DATABASE_URL")]
    pub database_url: Option<String>,
    /// PEM file of the CA (or CAs, while rotating) that signs every process's certificate.
    #[arg(long, env = "PAXOS_AGENT_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// PEM certificate of this agent (spiffe://<group>/agent/<participant>).
    #[arg(long, env = "PAXOS_AGENT_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "PAXOS_AGENT_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Run without TLS: plaintext, and every caller may do anything. Development only.
    #[arg(long, env = "PAXOS_AGENT_INSECURE")]
    pub insecure: Option<bool>,
    /// Connect to PostgreSQL over TLS, verifying its certificate against this CA file and
    /// the host in --database-url (libpq's sslmode=verify-full). Without it: plaintext.
    #[arg(long, env = "PAXOS_AGENT_DATABASE_TLS_CA")]
    pub database_tls_ca: Option<PathBuf>,
    /// Address to listen on (host:port).
    #[arg(long, env = "PAXOS_AGENT_LISTEN")]
    pub listen: Option<String>,
    /// Address the replicas use to reach this agent (defaults to --listen).
    #[arg(long, env = "PAXOS_AGENT_ADVERTISE")]
    pub advertise: Option<String>,
    /// Coordinator replica addresses in replica-id order, comma separated.
    #[arg(long, env = "PAXOS_AGENT_COORDINATORS", value_delimiter = ',')]
    pub coordinators: Option<Vec<String>>,
    /// Maximum PostgreSQL connections (one per open branch).
    #[arg(long, env = "PAXOS_AGENT_POOL_SIZE")]
    pub pool_size: Option<usize>,
    /// An open branch idle this long (ms) is rolled back.
    #[arg(long, env = "PAXOS_AGENT_BRANCH_TIMEOUT_MS")]
    pub branch_timeout_ms: Option<u64>,
    /// A prepared branch without a decision this long (ms) asks the group for it.
    #[arg(long, env = "PAXOS_AGENT_IN_DOUBT_AFTER_MS")]
    pub in_doubt_after_ms: Option<u64>,
    /// A statement waiting this long (ms) for a row lock fails and its transaction aborts
    /// (PostgreSQL cannot detect deadlocks that span databases).
    #[arg(long, env = "PAXOS_AGENT_LOCK_TIMEOUT_MS")]
    pub lock_timeout_ms: Option<u64>,
    /// A branch's statement running this long (ms) is cancelled and the branch can only
    /// abort (0: no limit).
    #[arg(long, env = "PAXOS_AGENT_STATEMENT_TIMEOUT_MS")]
    pub statement_timeout_ms: Option<u64>,
    /// Longest SQL text (bytes) Execute accepts.
    #[arg(long, env = "PAXOS_AGENT_MAX_STATEMENT_BYTES")]
    pub max_statement_bytes: Option<usize>,
    /// Largest result (bytes, about its size in the response) Execute returns; a statement
    /// with a larger one fails its branch.
    #[arg(long, env = "PAXOS_AGENT_MAX_RESULT_BYTES")]
    pub max_result_bytes: Option<usize>,
    /// How long (ms) a request waits for a free database connection before it is refused
    /// with RESOURCE_EXHAUSTED.
    #[arg(long, env = "PAXOS_AGENT_POOL_WAIT_TIMEOUT_MS")]
    pub pool_wait_timeout_ms: Option<u64>,
    /// Branches open (not prepared yet) at once; more are refused with RESOURCE_EXHAUSTED
    /// (default: the pool size).
    #[arg(long, env = "PAXOS_AGENT_MAX_OPEN_BRANCHES")]
    pub max_open_branches: Option<usize>,
    /// Calls served at once; more are refused with RESOURCE_EXHAUSTED.
    #[arg(long, env = "PAXOS_AGENT_MAX_CONCURRENT_CALLS")]
    pub max_concurrent_calls: Option<usize>,
    /// How long (ms) each committed branch's proof row stays in paxos_commit.committed.
    #[arg(long, env = "PAXOS_AGENT_COMMIT_PROOF_RETENTION_MS")]
    pub commit_proof_retention_ms: Option<u64>,
    /// After SIGTERM, how long (ms) statements and PREPAREs already running may take to
    /// finish before the agent rolls back its open branches and exits anyway. Keep it well
    /// below the stop deadline (PAXOS_COMMIT_STOP_DEADLINE_MS, 9 s).
    #[arg(long, env = "PAXOS_AGENT_DRAIN_TIMEOUT_MS")]
    pub drain_timeout_ms: Option<u64>,
    /// Where Prometheus scrapes this agent's metrics (host:port, path /metrics); none when
    /// unset.
    #[arg(long, env = "PAXOS_AGENT_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// Where to serve the gRPC health service alone, in plaintext (host:port), for probes
    /// that speak no TLS (Kubernetes' gRPC probe); none when unset.
    #[arg(long, env = "PAXOS_AGENT_HEALTH_LISTEN")]
    pub health_listen: Option<String>,
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub security: Security,
    pub database_tls: DbConnect,
    pub participant: String,
    pub group: String,
    pub database_url: String,
    pub listen: String,
    pub advertise: String,
    pub coordinators: Vec<String>,
    pub pool_size: usize,
    pub branch_timeout: Duration,
    pub in_doubt_after: Duration,
    pub lock_timeout: Duration,
    /// Zero: no limit.
    pub statement_timeout: Duration,
    pub max_statement_bytes: usize,
    pub max_result_bytes: usize,
    pub pool_wait_timeout: Duration,
    pub max_open_branches: usize,
    pub max_concurrent_calls: usize,
    pub commit_proof_retention: Duration,
    /// After SIGTERM: how long running statements and PREPAREs may take to finish.
    pub drain_timeout: Duration,
    /// The Prometheus listener (host:port), if any.
    pub metrics_listen: Option<String>,
    /// The plaintext health-only listener (host:port), if any.
    pub health_listen: Option<String>,
}

impl AgentArgs {
    pub fn resolve(&self) -> Result<AgentConfig, ConfigError> {
        let file = match &self.config {
            Some(path) => {
                let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                    path: path.clone(),
                    source,
                })?;
                toml::from_str(&text).map_err(|source| ConfigError::Parse {
                    path: path.clone(),
                    source,
                })?
            }
            None => FileConfig::default(),
        };
        let participant = self
            .participant
            .clone()
            .or(file.participant)
            .ok_or_else(|| ConfigError::Invalid("a participant id is required".into()))?;
        if !valid_name(&participant) {
            return Err(ConfigError::Invalid(format!(
                "participant id {participant:?} must be 1-64 characters of [A-Za-z0-9_-]"
            )));
        }
        let group = paxos_commit_proto::tls::group_or_default(self.group.clone().or(file.group))
            .map_err(ConfigError::Invalid)?;
        let security = Security::from_settings(
            &group,
            self.insecure.or(file.insecure).unwrap_or(false),
            self.tls_ca.clone().or(file.tls_ca),
            self.tls_cert.clone().or(file.tls_cert),
            self.tls_key.clone().or(file.tls_key),
        )
        .map_err(ConfigError::Invalid)?;
        if let Some(tls) = security.tls() {
            let me = Role::Agent(participant.clone());
            if tls.role != me {
                return Err(ConfigError::Invalid(format!(
                    "this agent is {}, but its certificate names {}",
                    me.uri(&group),
                    tls.role.uri(&tls.group)
                )));
            }
        }
        let database_url = self
            .database_url
            .clone()
            .or(file.database_url)
            .ok_or_else(|| ConfigError::Invalid("a database URL is required".into()))?;
        let listen = self
            .listen
            .clone()
            .or(file.listen)
            .unwrap_or_else(|| "127.0.0.1:7500".into());
        let coordinators = self
            .coordinators
            .clone()
            .or(file.coordinators)
            .unwrap_or_else(|| vec!["127.0.0.1:7400".into()]);
        if coordinators.is_empty() {
            return Err(ConfigError::Invalid(
                "at least one coordinator address is required".into(),
            ));
        }
        let pool_size = self.pool_size.or(file.pool_size).unwrap_or(64).max(2);
        let database_tls = DbConnect::from_ca(
            self.database_tls_ca
                .clone()
                .or(file.database_tls_ca)
                .as_deref(),
        )
        .map_err(ConfigError::Invalid)?;
        Ok(AgentConfig {
            security,
            database_tls,
            participant,
            group,
            database_url,
            advertise: self
                .advertise
                .clone()
                .or(file.advertise)
                .unwrap_or_else(|| listen.clone()),
            listen,
            coordinators,
            pool_size,
            branch_timeout: Duration::from_millis(
                self.branch_timeout_ms
                    .or(file.branch_timeout_ms)
                    .unwrap_or(120_000),
            ),
            in_doubt_after: Duration::from_millis(
                self.in_doubt_after_ms
                    .or(file.in_doubt_after_ms)
                    .unwrap_or(3_000),
            ),
            lock_timeout: Duration::from_millis(
                self.lock_timeout_ms
                    .or(file.lock_timeout_ms)
                    .unwrap_or(2_000)
                    .max(1),
            ),
            statement_timeout: Duration::from_millis(
                self.statement_timeout_ms
                    .or(file.statement_timeout_ms)
                    .unwrap_or(30_000),
            ),
            max_statement_bytes: self
                .max_statement_bytes
                .or(file.max_statement_bytes)
                .unwrap_or(1 << 20)
                .max(1),
            max_result_bytes: self
                .max_result_bytes
                .or(file.max_result_bytes)
                .unwrap_or(4 << 20)
                .max(1),
            pool_wait_timeout: Duration::from_millis(
                self.pool_wait_timeout_ms
                    .or(file.pool_wait_timeout_ms)
                    .unwrap_or(5_000)
                    .max(1),
            ),
            max_open_branches: self
                .max_open_branches
                .or(file.max_open_branches)
                .unwrap_or(pool_size)
                .max(1),
            max_concurrent_calls: self
                .max_concurrent_calls
                .or(file.max_concurrent_calls)
                .unwrap_or(10_000)
                .max(1),
            commit_proof_retention: Duration::from_millis(
                self.commit_proof_retention_ms
                    .or(file.commit_proof_retention_ms)
                    .unwrap_or(86_400_000),
            ),
            drain_timeout: Duration::from_millis(
                self.drain_timeout_ms
                    .or(file.drain_timeout_ms)
                    .unwrap_or(3_000),
            ),
            metrics_listen: self.metrics_listen.clone().or(file.metrics_listen),
            health_listen: self.health_listen.clone().or(file.health_listen),
        })
    }
}
