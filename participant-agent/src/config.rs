//! Agent configuration: a TOML file, overridden by flags and `PAXOS_AGENT_*` variables.

use clap::Args;
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
    listen: Option<String>,
    advertise: Option<String>,
    coordinators: Option<Vec<String>>,
    pool_size: Option<usize>,
    branch_timeout_ms: Option<u64>,
    in_doubt_after_ms: Option<u64>,
    lock_timeout_ms: Option<u64>,
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
}

#[derive(Debug, Clone)]
pub struct AgentConfig {
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
        let valid = |c: char| c.is_ascii_alphanumeric() || c == '_' || c == '-';
        if participant.is_empty() || participant.len() > 64 || !participant.chars().all(valid) {
            return Err(ConfigError::Invalid(format!(
                "participant id {participant:?} must be 1-64 characters of [A-Za-z0-9_-]"
            )));
        }
        let group = self
            .group
            .clone()
            .or(file.group)
            .unwrap_or_else(|| "main".into());
        if group.is_empty() || group.len() > 64 || !group.chars().all(valid) {
            return Err(ConfigError::Invalid(format!(
                "group {group:?} must be 1-64 characters of [A-Za-z0-9_-]"
            )));
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
        Ok(AgentConfig {
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
            pool_size: self.pool_size.or(file.pool_size).unwrap_or(64).max(2),
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
        })
    }
}
