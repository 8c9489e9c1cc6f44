//! Replica configuration: a TOML file, overridden by flags and `PAXOS_COMMIT_*` variables.
//! txctl reads the same file, so an operator points both at one place.

use clap::Args;
use paxos_commit_proto::tls::Security;
use serde::Deserialize;
use std::path::{Path, PathBuf};
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

/// The file format. Every field can also be given as a flag.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub group: Option<String>,
    pub id: Option<u32>,
    pub id_from_hostname: Option<bool>,
    pub replicas: Option<Vec<String>>,
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub takeover_after_ms: Option<u64>,
    pub open_timeout_ms: Option<u64>,
    pub resend_after_ms: Option<u64>,
    pub retention_ms: Option<u64>,
    pub commit_timeout_ms: Option<u64>,
    pub return_on_decision: Option<bool>,
    pub tls_ca: Option<PathBuf>,
    pub tls_cert: Option<PathBuf>,
    pub tls_key: Option<PathBuf>,
    pub insecure: Option<bool>,
    pub max_open_transactions: Option<usize>,
    pub max_concurrent_calls: Option<usize>,
    pub drain_timeout_ms: Option<u64>,
    pub fsync_stall_ms: Option<u64>,
    pub outcome_retention_days: Option<u64>,
    pub metrics_listen: Option<String>,
    pub audit_interval_ms: Option<u64>,
    pub audit_window_ms: Option<u64>,
    pub operator_listen: Option<String>,
    pub health_listen: Option<String>,
    /// Agents, for txctl: participant id → address.
    #[serde(default)]
    pub agents: std::collections::BTreeMap<String, String>,
}

/// Flags (and environment variables) shared by the coordinator and txctl.
#[derive(Debug, Clone, Default, Args)]
pub struct ConfigArgs {
    /// TOML configuration file.
    #[arg(long, env = "PAXOS_COMMIT_CONFIG")]
    pub config: Option<PathBuf>,
    /// Name of the coordinator group; part of every gid.
    #[arg(long, env = "PAXOS_COMMIT_GROUP")]
    pub group: Option<String>,
    /// This replica's index in --replicas.
    #[arg(long, env = "PAXOS_COMMIT_ID")]
    pub id: Option<u32>,
    /// Take the replica's index from the host name instead: the number after its last `-`
    /// (`coordinator-2` is replica 2, as a StatefulSet names its pods). However the id is
    /// given, `{id}` in --tls-cert, --tls-key and --data-dir stands for it.
    #[arg(long, env = "PAXOS_COMMIT_ID_FROM_HOSTNAME")]
    pub id_from_hostname: Option<bool>,
    /// Addresses (host:port) of all 2F+1 replicas, in replica-id order, comma separated.
    #[arg(long, env = "PAXOS_COMMIT_REPLICAS", value_delimiter = ',')]
    pub replicas: Option<Vec<String>>,
    /// Address to listen on (defaults to this replica's entry in --replicas).
    #[arg(long, env = "PAXOS_COMMIT_LISTEN")]
    pub listen: Option<String>,
    /// Directory of the acceptor log.
    #[arg(long, env = "PAXOS_COMMIT_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Silence (ms) after which an undecided transaction is taken over.
    #[arg(long, env = "PAXOS_COMMIT_TAKEOVER_AFTER_MS")]
    pub takeover_after_ms: Option<u64>,
    /// How long (ms) a begun transaction may stay open before Commit.
    #[arg(long, env = "PAXOS_COMMIT_OPEN_TIMEOUT_MS")]
    pub open_timeout_ms: Option<u64>,
    /// How long (ms) a finished transaction stays answerable by GetStatus.
    #[arg(long, env = "PAXOS_COMMIT_RETENTION_MS")]
    pub retention_ms: Option<u64>,
    /// How long (ms) Commit waits for a decision before answering Unavailable.
    #[arg(long, env = "PAXOS_COMMIT_COMMIT_TIMEOUT_MS")]
    pub commit_timeout_ms: Option<u64>,
    /// Answer Commit as soon as the decision is chosen, not after the participants applied it.
    #[arg(long, env = "PAXOS_COMMIT_RETURN_ON_DECISION")]
    pub return_on_decision: Option<bool>,
    /// PEM file of the CA (or CAs, while rotating) that signs every process's certificate.
    #[arg(long, env = "PAXOS_COMMIT_TLS_CA")]
    pub tls_ca: Option<PathBuf>,
    /// PEM certificate of this process (txctl: the operator's).
    #[arg(long, env = "PAXOS_COMMIT_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --tls-cert.
    #[arg(long, env = "PAXOS_COMMIT_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    /// Run without TLS: plaintext, and every caller may do anything. Development only.
    #[arg(long, env = "PAXOS_COMMIT_INSECURE")]
    pub insecure: Option<bool>,
    /// Most transactions this replica leads at once (open or deciding); Begin beyond it
    /// answers RESOURCE_EXHAUSTED.
    #[arg(long, env = "PAXOS_COMMIT_MAX_OPEN_TRANSACTIONS")]
    pub max_open_transactions: Option<usize>,
    /// Most unary calls served at once; more answer RESOURCE_EXHAUSTED.
    #[arg(long, env = "PAXOS_COMMIT_MAX_CONCURRENT_CALLS")]
    pub max_concurrent_calls: Option<usize>,
    /// Agents for txctl, as id=host:port, comma separated.
    #[arg(long, env = "PAXOS_COMMIT_AGENTS", value_delimiter = ',')]
    pub agents: Option<Vec<String>>,
    /// Bring back a replica whose acceptor log is damaged or lost (README runbook "A damaged
    /// acceptor log"): the log is moved aside and the replica rejoins as an acceptor that
    /// answers only for transactions begun after it. Refused when the log is intact.
    #[arg(long, env = "PAXOS_COMMIT_REJOIN")]
    pub rejoin: bool,
    /// `--rejoin` for the replicas with these ids only (comma separated), for settings shared
    /// by every replica, such as a StatefulSet's template: set it, let the named replica
    /// rejoin, then remove it (docs/DEPLOY.md, "A lost volume").
    #[arg(long, env = "PAXOS_COMMIT_REJOIN_REPLICAS", value_delimiter = ',')]
    pub rejoin_replicas: Option<Vec<u32>>,
    /// Longest (ms) a stopping replica waits for the commits it leads to be decided.
    #[arg(long, env = "PAXOS_COMMIT_DRAIN_TIMEOUT_MS")]
    pub drain_timeout_ms: Option<u64>,
    /// An fsync of the acceptor log that has not returned after this many ms marks the
    /// replica degraded (NOT_SERVING; Begin refused) until it returns.
    #[arg(long, env = "PAXOS_COMMIT_FSYNC_STALL_MS")]
    pub fsync_stall_ms: Option<u64>,
    /// How many days GetStatus still answers a transaction's outcome after its full state
    /// was compacted away (9 bytes per transaction on disk).
    #[arg(long, env = "PAXOS_COMMIT_OUTCOME_RETENTION_DAYS")]
    pub outcome_retention_days: Option<u64>,
    /// Where Prometheus scrapes this replica's metrics (host:port, path /metrics); none when
    /// unset.
    #[arg(long, env = "PAXOS_COMMIT_METRICS_LISTEN")]
    pub metrics_listen: Option<String>,
    /// How often this replica audits the agents' databases against the group's outcomes
    /// (needs the agents' addresses); 0 turns it off. Default 300000 (5 minutes).
    #[arg(long, env = "PAXOS_COMMIT_AUDIT_INTERVAL_MS")]
    pub audit_interval_ms: Option<u64>,
    /// How far back the periodic audit looks, in ms. Default: twice the interval, at least a
    /// minute (each transaction is checked about twice, and the reads stay proportional to
    /// the commits since the last audit).
    #[arg(long, env = "PAXOS_COMMIT_AUDIT_WINDOW_MS")]
    pub audit_window_ms: Option<u64>,
    /// Where this replica serves its read-only operator page (host:port; HTTPS that admits
    /// operator certificates only, unless the deployment runs insecure); none when unset.
    #[arg(long, env = "PAXOS_COMMIT_OPERATOR_LISTEN")]
    pub operator_listen: Option<String>,
    /// Where to serve the gRPC health service alone, in plaintext (host:port), for probes
    /// that speak no TLS (Kubernetes' gRPC probe); none when unset.
    #[arg(long, env = "PAXOS_COMMIT_HEALTH_LISTEN")]
    pub health_listen: Option<String>,
}

/// The resolved configuration of a replica.
#[derive(Debug, Clone)]
pub struct ReplicaConfig {
    pub group: String,
    pub id: u32,
    pub replicas: Vec<String>,
    pub listen: String,
    pub data_dir: PathBuf,
    pub takeover_after: Duration,
    pub open_timeout: Duration,
    pub resend_after: Duration,
    pub retention: Duration,
    pub commit_timeout: Duration,
    pub return_on_decision: bool,
    pub agents: std::collections::BTreeMap<String, String>,
    pub security: Security,
    pub max_open_transactions: usize,
    pub max_concurrent_calls: usize,
    pub rejoin: bool,
    pub drain_timeout: Duration,
    pub fsync_stall: Duration,
    pub outcome_retention: Duration,
    /// The Prometheus listener (host:port), if any.
    pub metrics_listen: Option<String>,
    /// The periodic audit (zero: none); it runs only where agents are configured.
    pub audit_interval: Duration,
    pub audit_window: Duration,
    /// The operator page's listener (host:port), if any.
    pub operator_listen: Option<String>,
    /// The plaintext health-only listener (host:port), if any.
    pub health_listen: Option<String>,
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    toml::from_str(&text).map_err(|source| ConfigError::Parse {
        path: path.to_path_buf(),
        source,
    })
}

/// The replica index a host name carries: the number after the last `-` of its first label
/// (`coordinator-2`, `coordinator-2.coordinator.bank.svc`).
pub fn id_in_hostname(hostname: &str) -> Result<u32, String> {
    let first = hostname.split('.').next().unwrap_or_default();
    let ordinal = first.rsplit_once('-').map(|(_, n)| n).unwrap_or_default();
    if ordinal.is_empty() || !ordinal.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!(
            "the host name {hostname:?} does not end in -<replica id> (as coordinator-2 does)"
        ));
    }
    ordinal
        .parse()
        .map_err(|_| format!("the replica id in host name {hostname:?} is too large"))
}

/// This machine's host name, as the kernel has it (in a pod: the pod's name).
fn hostname() -> Result<String, String> {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its whole length, and gethostname writes at most that.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    if rc != 0 {
        return Err(format!(
            "cannot read the host name: {}",
            std::io::Error::last_os_error()
        ));
    }
    let end = buf.iter().position(|b| *b == 0).unwrap_or(buf.len());
    String::from_utf8(buf[..end].to_vec()).map_err(|_| "the host name is not UTF-8".to_string())
}

/// `{id}` in a path, replaced by the replica id: one Secret or one directory layout for
/// every replica of a StatefulSet, each picking its own files.
fn with_id(path: PathBuf, id: u32) -> PathBuf {
    match path.to_str() {
        Some(text) if text.contains("{id}") => PathBuf::from(text.replace("{id}", &id.to_string())),
        _ => path,
    }
}

impl ConfigArgs {
    /// File first, then flags and environment on top.
    pub fn resolve(&self) -> Result<ReplicaConfig, ConfigError> {
        self.resolve_on(hostname)
    }

    /// [`ConfigArgs::resolve`], with the host name read by `hostname` (when the id comes
    /// from it).
    pub fn resolve_on(
        &self,
        hostname: impl FnOnce() -> Result<String, String>,
    ) -> Result<ReplicaConfig, ConfigError> {
        let file = match &self.config {
            Some(p) => read_file(p)?,
            None => FileConfig::default(),
        };
        let replicas = self
            .replicas
            .clone()
            .or(file.replicas)
            .unwrap_or_else(|| vec!["127.0.0.1:7400".to_string()]);
        if replicas.is_empty() || replicas.len() > 255 || replicas.len().is_multiple_of(2) {
            return Err(ConfigError::Invalid(format!(
                "replicas must list 2F+1 addresses (1, 3, 5, ...), got {}",
                replicas.len()
            )));
        }
        let explicit = self.id.or(file.id);
        let id = if self
            .id_from_hostname
            .or(file.id_from_hostname)
            .unwrap_or(false)
        {
            let name = hostname().map_err(ConfigError::Invalid)?;
            let from_name = id_in_hostname(&name).map_err(ConfigError::Invalid)?;
            match explicit {
                Some(given) if given != from_name => {
                    return Err(ConfigError::Invalid(format!(
                        "id {given} is given, and the host name {name:?} says {from_name}: \
                         give one or the other"
                    )))
                }
                _ => from_name,
            }
        } else {
            explicit.unwrap_or(0)
        };
        let own = replicas.get(id as usize).cloned().ok_or_else(|| {
            ConfigError::Invalid(format!(
                "id {id} is not an index into the {} replicas",
                replicas.len()
            ))
        })?;
        let rejoin_replicas = self.rejoin_replicas.clone().unwrap_or_default();
        if let Some(bad) = rejoin_replicas
            .iter()
            .find(|&&r| r as usize >= replicas.len())
        {
            return Err(ConfigError::Invalid(format!(
                "rejoin_replicas names replica {bad}, but there are {} replicas",
                replicas.len()
            )));
        }
        let mut agents = file.agents;
        for entry in self.agents.iter().flatten() {
            let (k, v) = entry.split_once('=').ok_or_else(|| {
                ConfigError::Invalid(format!("agent {entry:?} is not id=host:port"))
            })?;
            agents.insert(k.to_string(), v.to_string());
        }
        let group = paxos_commit_proto::tls::group_or_default(self.group.clone().or(file.group))
            .map_err(ConfigError::Invalid)?;
        let security = Security::from_settings(
            &group,
            self.insecure.or(file.insecure).unwrap_or(false),
            self.tls_ca.clone().or(file.tls_ca),
            self.tls_cert
                .clone()
                .or(file.tls_cert)
                .map(|p| with_id(p, id)),
            self.tls_key
                .clone()
                .or(file.tls_key)
                .map(|p| with_id(p, id)),
        )
        .map_err(ConfigError::Invalid)?;
        let ms = |flag: Option<u64>, file: Option<u64>, default: u64| {
            Duration::from_millis(flag.or(file).unwrap_or(default))
        };
        let audit_interval = ms(self.audit_interval_ms, file.audit_interval_ms, 300_000);
        Ok(ReplicaConfig {
            group,
            id,
            listen: self.listen.clone().or(file.listen).unwrap_or(own),
            data_dir: with_id(
                self.data_dir
                    .clone()
                    .or(file.data_dir)
                    .unwrap_or_else(|| PathBuf::from("paxos-commit-data/{id}")),
                id,
            ),
            takeover_after: ms(self.takeover_after_ms, file.takeover_after_ms, 2_000),
            open_timeout: ms(self.open_timeout_ms, file.open_timeout_ms, 60_000),
            resend_after: ms(None, file.resend_after_ms, 1_000),
            retention: ms(self.retention_ms, file.retention_ms, 60_000),
            commit_timeout: ms(self.commit_timeout_ms, file.commit_timeout_ms, 10_000),
            return_on_decision: self
                .return_on_decision
                .or(file.return_on_decision)
                .unwrap_or(false),
            replicas,
            agents,
            security,
            max_open_transactions: self
                .max_open_transactions
                .or(file.max_open_transactions)
                .unwrap_or(100_000)
                .max(1),
            max_concurrent_calls: self
                .max_concurrent_calls
                .or(file.max_concurrent_calls)
                .unwrap_or(10_000)
                .max(1),
            rejoin: self.rejoin || rejoin_replicas.contains(&id),
            drain_timeout: ms(self.drain_timeout_ms, file.drain_timeout_ms, 5_000),
            fsync_stall: ms(self.fsync_stall_ms, file.fsync_stall_ms, 2_000),
            outcome_retention: Duration::from_secs(
                24 * 3600
                    * self
                        .outcome_retention_days
                        .or(file.outcome_retention_days)
                        .unwrap_or(7)
                        .max(1),
            ),
            metrics_listen: self.metrics_listen.clone().or(file.metrics_listen),
            audit_interval,
            audit_window: ms(
                self.audit_window_ms,
                file.audit_window_ms,
                (2 * audit_interval.as_millis() as u64).max(60_000),
            ),
            operator_listen: self.operator_listen.clone().or(file.operator_listen),
            health_listen: self.health_listen.clone().or(file.health_listen),
        })
    }
}

impl ReplicaConfig {
    pub fn core(&self) -> paxos_commit_core::Config {
        let ms = |d: Duration| d.as_millis() as u64;
        paxos_commit_core::Config {
            id: self.id,
            replicas: self.replicas.len() as u32,
            takeover_after_ms: ms(self.takeover_after),
            open_timeout_ms: ms(self.open_timeout),
            resend_after_ms: ms(self.resend_after),
            retention_ms: ms(self.retention),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_replica_id_is_the_number_after_the_last_dash_of_the_host_name() {
        assert_eq!(id_in_hostname("coordinator-2"), Ok(2));
        assert_eq!(id_in_hostname("paxos-commit-coordinator-0"), Ok(0));
        assert_eq!(
            id_in_hostname("coordinator-14.coordinator.bank.svc"),
            Ok(14)
        );
        for bad in [
            "coordinator",
            "coordinator-",
            "coordinator-x",
            "coordinator-+1",
            "coordinator- 1",
            "coordinator-1a",
            "",
            "-",
            "coordinator-99999999999",
            "coordinator.-2",
        ] {
            assert!(id_in_hostname(bad).is_err(), "{bad:?} was accepted");
        }
    }

    fn args(id: Option<u32>, from_hostname: bool) -> ConfigArgs {
        ConfigArgs {
            id,
            id_from_hostname: Some(from_hostname),
            replicas: Some(vec!["a:1".into(), "b:1".into(), "c:1".into()]),
            insecure: Some(true),
            data_dir: Some(PathBuf::from("/var/lib/paxos-commit/{id}")),
            ..ConfigArgs::default()
        }
    }

    #[test]
    fn a_replica_takes_its_id_and_its_paths_from_the_host_name() {
        let cfg = args(None, true)
            .resolve_on(|| Ok("coordinator-2".into()))
            .unwrap();
        assert_eq!(cfg.id, 2);
        assert_eq!(cfg.listen, "c:1");
        assert_eq!(cfg.data_dir, PathBuf::from("/var/lib/paxos-commit/2"));
        // The same id given twice is fine; two different ones are refused.
        assert!(args(Some(2), true)
            .resolve_on(|| Ok("coordinator-2".into()))
            .is_ok());
        let e = args(Some(1), true)
            .resolve_on(|| Ok("coordinator-2".into()))
            .unwrap_err();
        assert!(e.to_string().contains("give one or the other"), "{e}");
        // Beyond the replica list, or a name without an id: refused, not replica 0.
        let e = args(None, true)
            .resolve_on(|| Ok("coordinator-3".into()))
            .unwrap_err();
        assert!(e.to_string().contains("not an index"), "{e}");
        assert!(args(None, true)
            .resolve_on(|| Ok("db-host".into()))
            .is_err());
        assert!(args(None, true)
            .resolve_on(|| Err("no host name".into()))
            .is_err());
        // Not asked for: the host name is not even read.
        let cfg = args(Some(1), false)
            .resolve_on(|| panic!("read the host name"))
            .unwrap();
        assert_eq!(cfg.id, 1);
        assert_eq!(cfg.data_dir, PathBuf::from("/var/lib/paxos-commit/1"));
    }

    #[test]
    fn rejoin_replicas_names_the_replicas_that_rejoin_and_nothing_else() {
        let with = |list: Vec<u32>, host: &'static str| {
            ConfigArgs {
                rejoin_replicas: Some(list),
                ..args(None, true)
            }
            .resolve_on(move || Ok(host.into()))
        };
        assert!(with(vec![2], "coordinator-2").unwrap().rejoin);
        assert!(with(vec![0, 2], "coordinator-2").unwrap().rejoin);
        assert!(!with(vec![2], "coordinator-1").unwrap().rejoin);
        assert!(
            !args(None, true)
                .resolve_on(|| Ok("coordinator-1".into()))
                .unwrap()
                .rejoin
        );
        // A typo must not pass for "nobody".
        let e = with(vec![3], "coordinator-1").unwrap_err();
        assert!(
            e.to_string().contains("rejoin_replicas names replica 3"),
            "{e}"
        );
    }
}
