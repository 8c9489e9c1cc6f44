//! What an operator asks of a whole deployment (txctl): every replica's and every agent's
//! view gathered in parallel, unreachable ones reported as such rather than failing the whole
//! question, and resolution that always goes through the coordinator group.

use crate::config::ReplicaConfig;
use paxos_commit_core::types::parse_gid;
use paxos_commit_core::{Outcome, TxnId};
use paxos_commit_proto::client::lazy_channel;
use paxos_commit_proto::convert::{outcome_from_pb, outcome_to_pb};
use paxos_commit_proto::pb;
use paxos_commit_proto::pb::agent_client::AgentClient;
use paxos_commit_proto::pb::coordinator_client::CoordinatorClient;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Duration;
use tonic::transport::Channel;
use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("no coordinator replica reachable: {0}")]
    Unreachable(String),
    #[error("refused: {0}")]
    Refused(String),
    #[error("{0}")]
    Rpc(String),
}

pub struct Deployment {
    pub cfg: ReplicaConfig,
    pub(crate) replicas: Vec<CoordinatorClient<Channel>>,
    pub(crate) agents: BTreeMap<String, AgentClient<Channel>>,
}

#[derive(Debug, Clone, Serialize)]
pub struct VoteView {
    pub acceptor: u32,
    pub ballot: u64,
    pub vote: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct ParticipantView {
    pub id: String,
    pub address: String,
    pub votes: Vec<VoteView>,
    pub applied: bool,
}

#[derive(Debug, Clone, Serialize)]
pub struct TxnView {
    pub txid: String,
    pub state: String,
    pub leader: u32,
    pub expired: bool,
    pub promised_ballot: u64,
    pub participants: Vec<ParticipantView>,
}

#[derive(Debug, Clone, Serialize)]
pub struct InDoubt {
    pub txid: String,
    pub gid: String,
    pub participant: String,
    pub age_ms: u64,
    /// What the coordinator group says (committed / aborted / in progress / unknown /
    /// unreachable).
    pub group_state: String,
    pub participants: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct ReplicaHealth {
    pub replica: u32,
    pub address: String,
    pub up: bool,
    pub error: Option<String>,
    pub leading: u64,
    pub undecided: u64,
    pub log_bytes: u64,
    pub oldest_undecided: Option<(String, u64)>,
    pub decided_retained: u64,
    /// "serving", "degraded", "draining" or "joining" (empty when down), and why.
    pub state: String,
    pub state_reason: String,
    pub rejoined: bool,
    /// This life of the replica (a new number: a new log); 0 when down.
    pub incarnation: u64,
    /// Streams and batches refused as sent by another incarnation of a peer.
    pub not_heard: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct AgentHealth {
    pub participant: String,
    pub address: String,
    pub up: bool,
    pub error: Option<String>,
    pub prepared: usize,
    pub open_branches: u64,
    pub oldest_prepared: Option<(String, u64)>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Resolution {
    pub txid: String,
    pub outcome: String,
    pub applied_on: Vec<String>,
    pub errors: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct HeuristicCheck {
    pub gid: String,
    pub txid: String,
    pub participant: String,
    pub asked: String,
    pub replicas_reached: Vec<u32>,
    pub replicas_unreachable: Vec<u32>,
    pub checks: Vec<String>,
    pub contradiction: Option<String>,
}

fn state_name(s: i32) -> String {
    paxos_commit_proto::heuristic::state_name(s).to_string()
}

fn vote_name(v: i32) -> String {
    paxos_commit_proto::heuristic::vote_name(v).to_string()
}

fn view(r: &pb::StatusResponse) -> TxnView {
    TxnView {
        txid: r.txid.clone(),
        state: state_name(r.state),
        leader: r.leader,
        expired: r.expired,
        promised_ballot: r.promised_ballot,
        participants: r
            .participants
            .iter()
            .map(|p| {
                let (id, address) = p
                    .participant
                    .as_ref()
                    .map(|x| (x.id.clone(), x.address.clone()))
                    .unwrap_or_default();
                ParticipantView {
                    id,
                    address,
                    votes: p
                        .votes
                        .iter()
                        .map(|v| VoteView {
                            acceptor: v.acceptor,
                            ballot: v.ballot,
                            vote: vote_name(v.vote),
                        })
                        .collect(),
                    applied: p.applied,
                }
            })
            .collect(),
    }
}

fn outcome_name(o: Outcome) -> String {
    o.to_string()
}

impl Deployment {
    pub fn new(cfg: ReplicaConfig, timeout: Duration) -> Result<Deployment, OpsError> {
        let chan = |a: &str| {
            lazy_channel(a, Some(timeout), &cfg.security)
                .map_err(|e| OpsError::Invalid(e.to_string()))
        };
        let replicas = cfg
            .replicas
            .iter()
            .map(|a| chan(a).map(CoordinatorClient::new))
            .collect::<Result<_, _>>()?;
        let agents = cfg
            .agents
            .iter()
            .map(|(id, a)| Ok((id.clone(), AgentClient::new(chan(a)?))))
            .collect::<Result<_, OpsError>>()?;
        Ok(Deployment {
            cfg,
            replicas,
            agents,
        })
    }

    /// The whole group's answer for one transaction (asked of the first replica that answers).
    pub async fn status(&self, txid: &str) -> Result<TxnView, OpsError> {
        let mut last = String::from("no replicas configured");
        for r in &self.replicas {
            match r
                .clone()
                .get_status(pb::StatusRequest {
                    txid: txid.to_string(),
                    local_only: false,
                })
                .await
            {
                Ok(resp) => return Ok(view(&resp.into_inner())),
                Err(s) if s.code() == tonic::Code::InvalidArgument => {
                    return Err(OpsError::Invalid(s.message().to_string()))
                }
                Err(s) => last = s.message().to_string(),
            }
        }
        Err(OpsError::Unreachable(last))
    }

    async fn prepared_by_agent(
        &self,
    ) -> BTreeMap<String, Result<pb::ListPreparedResponse, Status>> {
        let asks = self.agents.iter().map(|(id, a)| {
            let mut a = a.clone();
            let id = id.clone();
            async move {
                let r = a
                    .list_prepared(pb::Empty {})
                    .await
                    .map(tonic::Response::into_inner);
                (id, r)
            }
        });
        futures::future::join_all(asks).await.into_iter().collect()
    }

    /// Every prepared transaction of ours on every agent, with what the group knows of it.
    /// Also returns the agents that could not be asked.
    pub async fn in_doubt(
        &self,
        older_than: Duration,
    ) -> Result<(Vec<InDoubt>, Vec<String>), OpsError> {
        if self.agents.is_empty() {
            return Err(OpsError::Invalid(
                "no agents configured: give --agents id=host:port,... or an [agents] table in \
                 the config file"
                    .into(),
            ));
        }
        let mut out = Vec::new();
        let mut unreachable = Vec::new();
        let mut views: BTreeMap<String, Option<TxnView>> = BTreeMap::new();
        for (agent, r) in self.prepared_by_agent().await {
            let list = match r {
                Ok(l) => l,
                Err(s) => {
                    unreachable.push(format!("{agent}: {}", s.message()));
                    continue;
                }
            };
            for p in list.prepared {
                if p.age_ms < older_than.as_millis() as u64 {
                    continue;
                }
                if !views.contains_key(&p.txid) {
                    let v = self.status(&p.txid).await.ok();
                    views.insert(p.txid.clone(), v);
                }
                let v = views.get(&p.txid).cloned().flatten();
                out.push(InDoubt {
                    group_state: v
                        .as_ref()
                        .map_or_else(|| "unreachable".to_string(), |v| v.state.clone()),
                    participants: v
                        .map(|v| v.participants.into_iter().map(|p| p.id).collect())
                        .unwrap_or_default(),
                    txid: p.txid,
                    gid: p.gid,
                    participant: p.participant,
                    age_ms: p.age_ms,
                });
            }
        }
        Ok((out, unreachable))
    }

    /// Drives one transaction to its decision through the group (a replica takes it over
    /// with a higher ballot if needed) and pushes the decision to the agents that hold it.
    pub async fn resolve(&self, txid: &str) -> Result<Resolution, OpsError> {
        let txn: TxnId = txid
            .parse()
            .map_err(|e: paxos_commit_core::types::BadTxnId| OpsError::Invalid(e.to_string()))?;
        // Which agents hold it prepared: they are the ones to finish, and one of them names
        // the instance the group can settle even if it never heard of the transaction.
        let mut holders = Vec::new();
        for (agent, r) in self.prepared_by_agent().await {
            if let Ok(list) = r {
                if list.prepared.iter().any(|p| p.txid == txid) {
                    holders.push(agent);
                }
            }
        }
        let n = self.replicas.len();
        let first = txn.leader() as usize % n.max(1);
        let mut outcome = None;
        let mut last = String::from("no replicas configured");
        for k in 0..n {
            let mut r = self.replicas[(first + k) % n].clone();
            let req = pb::ResolveRequest {
                txid: txid.to_string(),
                participant: holders.first().cloned().unwrap_or_default(),
                participants: Vec::new(),
            };
            match r.resolve(req).await {
                Ok(resp) => {
                    outcome = Some(
                        outcome_from_pb(resp.into_inner().outcome)
                            .map_err(|e| OpsError::Rpc(e.to_string()))?,
                    );
                    break;
                }
                Err(s) if s.code() == tonic::Code::NotFound => {
                    return Err(OpsError::Invalid(format!(
                        "{txid}: {} (and no agent holds it prepared)",
                        s.message()
                    )))
                }
                Err(s) => last = s.message().to_string(),
            }
        }
        let outcome = outcome.ok_or(OpsError::Unreachable(last))?;
        let mut resolution = Resolution {
            txid: txid.to_string(),
            outcome: outcome_name(outcome),
            applied_on: Vec::new(),
            errors: Vec::new(),
        };
        for agent in holders {
            let Some(mut a) = self.agents.get(&agent).cloned() else {
                continue;
            };
            let req = pb::DecideRequest {
                txid: txid.to_string(),
                outcome: outcome_to_pb(outcome),
            };
            match a.decide(req).await {
                Ok(_) => resolution.applied_on.push(agent),
                Err(s) => resolution.errors.push(format!("{agent}: {}", s.message())),
            }
        }
        Ok(resolution)
    }

    pub async fn replicas_health(&self) -> Vec<ReplicaHealth> {
        let asks = self.replicas.iter().enumerate().map(|(i, r)| {
            let mut r = r.clone();
            let address = self.cfg.replicas[i].clone();
            async move {
                match r.cluster_info(pb::Empty {}).await {
                    Ok(info) => {
                        let info = info.into_inner();
                        ReplicaHealth {
                            replica: i as u32,
                            address,
                            up: true,
                            error: None,
                            leading: info.leading,
                            undecided: info.undecided,
                            log_bytes: info.log_bytes,
                            oldest_undecided: info.oldest_undecided.map(|t| (t.txid, t.age_ms)),
                            decided_retained: info.decided_retained,
                            state: info.state,
                            state_reason: info.state_reason,
                            rejoined: info.rejoined,
                            incarnation: info.incarnation,
                            not_heard: info.not_heard,
                        }
                    }
                    Err(s) => ReplicaHealth {
                        replica: i as u32,
                        address,
                        up: false,
                        error: Some(s.message().to_string()),
                        leading: 0,
                        undecided: 0,
                        log_bytes: 0,
                        oldest_undecided: None,
                        decided_retained: 0,
                        state: String::new(),
                        state_reason: String::new(),
                        rejoined: false,
                        incarnation: 0,
                        not_heard: 0,
                    },
                }
            }
        });
        futures::future::join_all(asks).await
    }

    pub async fn agents_health(&self) -> Vec<AgentHealth> {
        self.prepared_by_agent()
            .await
            .into_iter()
            .map(|(id, r)| {
                let address = self.cfg.agents.get(&id).cloned().unwrap_or_default();
                match r {
                    Ok(list) => AgentHealth {
                        participant: id,
                        address,
                        up: true,
                        error: None,
                        prepared: list.prepared.len(),
                        open_branches: list.open_branches,
                        oldest_prepared: list
                            .prepared
                            .iter()
                            .max_by_key(|p| p.age_ms)
                            .map(|p| (p.txid.clone(), p.age_ms)),
                    },
                    Err(s) => AgentHealth {
                        participant: id,
                        address,
                        up: false,
                        error: Some(s.message().to_string()),
                        prepared: 0,
                        open_branches: 0,
                        oldest_prepared: None,
                    },
                }
            })
            .collect()
    }

    /// Checks a heuristic decision against everything reachable; refuses on any
    /// contradiction. Applies it only when `force` is set and nothing contradicts.
    pub async fn heuristic(
        &self,
        gid: &str,
        asked: Outcome,
        force: bool,
    ) -> Result<HeuristicCheck, (HeuristicCheck, OpsError)> {
        let mut check = HeuristicCheck {
            gid: gid.to_string(),
            txid: String::new(),
            participant: String::new(),
            asked: match asked {
                Outcome::Committed => "commit".to_string(),
                Outcome::Aborted => "abort".to_string(),
            },
            replicas_reached: Vec::new(),
            replicas_unreachable: Vec::new(),
            checks: Vec::new(),
            contradiction: None,
        };
        let Some((group, txn, participant)) = parse_gid(gid) else {
            let e = OpsError::Invalid(format!("{gid:?} is not a paxos-commit gid"));
            return Err((check, e));
        };
        check.txid = txn.to_string();
        check.participant = participant.to_string();
        if group != self.cfg.group {
            let e = OpsError::Invalid(format!(
                "gid belongs to group {group:?}, this configuration is group {:?}",
                self.cfg.group
            ));
            return Err((check, e));
        }
        let statuses =
            paxos_commit_proto::heuristic::local_statuses(&self.replicas, &check.txid).await;
        let group = paxos_commit_proto::heuristic::check(asked, &statuses);
        check.replicas_reached = group.replicas_reached;
        check.replicas_unreachable = group.replicas_unreachable;
        check.checks = group.checks;
        let contradiction = group.contradiction;
        check.contradiction = contradiction.clone();
        if let Some(c) = contradiction {
            return Err((check, OpsError::Refused(c)));
        }
        if !force {
            let e = OpsError::Refused(
                "nothing contradicts it, but a heuristic decision needs --force".to_string(),
            );
            return Err((check, e));
        }
        let Some(mut agent) = self.agents.get(participant).cloned() else {
            let e = OpsError::Invalid(format!("no agent configured for participant {participant}"));
            return Err((check, e));
        };
        let req = pb::HeuristicRequest {
            gid: gid.to_string(),
            outcome: outcome_to_pb(asked),
            force,
        };
        match agent.heuristic(req).await {
            Ok(_) => {
                check
                    .checks
                    .push(format!("applied {asked} on {participant}"));
                Ok(check)
            }
            Err(s) => {
                let e = OpsError::Rpc(format!("{participant}: {}", s.message()));
                Err((check, e))
            }
        }
    }
}

/// Parses "500ms", "30s", "5m", "2h" (a bare number is seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("{s:?} is not a duration like 30s, 5m, 500ms"))?;
    let ms = match unit {
        "ms" => n,
        "" | "s" => n * 1_000,
        "m" => n * 60_000,
        "h" => n * 3_600_000,
        _ => return Err(format!("{s:?}: unknown unit {unit:?} (ms, s, m, h)")),
    };
    Ok(Duration::from_millis(ms))
}

#[cfg(test)]
mod tests {
    use super::parse_duration;
    use std::time::Duration;

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30s"), Ok(Duration::from_secs(30)));
        assert_eq!(parse_duration("5m"), Ok(Duration::from_secs(300)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("2"), Ok(Duration::from_secs(2)));
        assert!(parse_duration("2d").is_err());
        assert!(parse_duration("x").is_err());
    }
}
